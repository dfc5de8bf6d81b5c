"""PESF (prefill expert skipping by selection frequency): the rule on closed-form cases, the hook against an
independent per-token reference built from the adapters, and the packed runtime against the FP path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eacmoe.pesf import (PESFConfig, PESFStats, apply_pesf, disable_pesf, enable_pesf, pesf_keep_mask,
                         real_token_mask, selection_counts)
from test_export import export, load
from test_pipeline import calib_ids, quantize
from tiny_models import FAMILY_NAMES, build

torch.set_num_threads(1)


def test_rule_closed_form() -> None:
    # one sequence of 4 tokens, top-2 of 4 experts: uniform count l*K/N = 2
    index = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3]])
    counts = selection_counts(index, batch=1, num_experts=4)
    assert counts.tolist() == [[4, 2, 1, 1]]
    # alpha 0.6 -> threshold 1.2: experts 2 and 3 are skipped
    assert pesf_keep_mask(counts, seq_len=4, top_k=2, alpha=0.6).tolist() == [[True, True, False, False]]
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    new_index, new_weights = apply_pesf(index, weights, 1, 4, 4, PESFConfig(alpha=0.6))
    assert new_index.tolist() == [[0, 1], [0, 4], [0, 1], [0, 4]]
    torch.testing.assert_close(new_weights, torch.tensor([[0.6, 0.4], [0.7, 0.0], [0.5, 0.5], [0.9, 0.0]]))
    _, renormalized = apply_pesf(index, weights, 1, 4, 4, PESFConfig(alpha=0.6, renormalize=True))
    torch.testing.assert_close(renormalized, torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0]]))


def test_sequences_are_counted_separately_and_decode_is_untouched() -> None:
    index = torch.tensor([[0, 1], [0, 1], [2, 3], [2, 3]])  # sequence 0 uses 0/1 only, sequence 1 uses 2/3 only
    weights = torch.full((4, 2), 0.5)
    new_index, _ = apply_pesf(index, weights, 2, 2, 4, PESFConfig(alpha=1.0))
    assert torch.equal(new_index, index)  # as one sequence of 4 tokens, every expert would fall under 2
    same_index, same_weights = apply_pesf(index, weights, 4, 1, 4, PESFConfig(alpha=5.0))
    assert same_index is index and same_weights is weights


def padded(rows: torch.Tensor, fill: torch.Tensor, length: int, side: str) -> torch.Tensor:
    """``rows`` (one per token) padded with copies of the row ``fill`` to ``length`` rows, on ``side``."""
    pad = fill.expand(length - len(rows), -1)
    return torch.cat([rows, pad] if side == "right" else [pad, rows])


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_not_counted_closed_form(side: str) -> None:
    # the closed-form sequence above padded to 8 positions routed to experts 2 and 3 (counted, they would pass the
    # threshold), batched with a sequence of one real token: each gets its routing alone, and the one-token
    # sequence is untouched like a decoding step (at alpha 5, counted, it would lose every expert)
    index = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    one_index, one_weights = torch.tensor([[3, 2]]), torch.tensor([[0.8, 0.2]])
    pad_index, pad_weights = torch.tensor([[2, 3]]), torch.tensor([[0.5, 0.5]])
    yes, no = torch.ones(1, 1), torch.zeros(1, 1)
    batch_index = torch.cat([padded(index, pad_index, 8, side), padded(one_index, pad_index, 8, side)])
    batch_weights = torch.cat([padded(weights, pad_weights, 8, side), padded(one_weights, pad_weights, 8, side)])
    real = torch.cat([padded(yes.expand(4, 1), no, 8, side), padded(yes, no, 8, side)]).reshape(2, 8).bool()
    seq0, seq1 = (slice(0, 4), slice(8, 9)) if side == "right" else (slice(4, 8), slice(15, 16))
    assert selection_counts(batch_index, 2, 4, real).tolist() == [[4, 2, 1, 1], [0, 0, 1, 1]]

    config = PESFConfig(alpha=0.6, renormalize=True)
    alone_stats, stats = PESFStats(), PESFStats()
    alone_index, alone_weights = apply_pesf(index, weights, 1, 4, 4, config, alone_stats)
    new_index, new_weights = apply_pesf(batch_index, batch_weights, 2, 8, 4, config, stats, real=real)
    assert torch.equal(new_index[seq0], alone_index) and torch.equal(new_weights[seq0], alone_weights)
    assert torch.equal(new_index[seq1], one_index) and torch.equal(new_weights[seq1], one_weights)
    # the stats count sequence 0's real slots only, as alone
    assert (stats.sequences, stats.slots, stats.skipped_slots, stats.expert_sequence_pairs) == (1, 8, 2, 4)
    assert stats == alone_stats
    new_index, _ = apply_pesf(batch_index, batch_weights, 2, 8, 4, PESFConfig(alpha=5.0), real=real)
    assert torch.equal(new_index[seq1], one_index)


def test_real_token_mask_rules() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert real_token_mask(mask, None).tolist() == [[False, False, True, True], [True, True, True, False]]
    zeros = torch.zeros(2, 4, dtype=torch.long)  # a mask, when given, decides even where the ids are 0
    assert torch.equal(real_token_mask(mask.float(), zeros), real_token_mask(mask, None))
    # no mask: only a trailing run of token 0 (lm_eval's right padding) is padding
    ids = torch.tensor([[0, 5, 0, 7, 0, 0], [4, 0, 3, 2, 1, 6]])
    assert real_token_mask(None, ids).tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    assert real_token_mask(None, None) is None
    # a 4-D mask (static cache): a query is real where it attends to its own key, past_length columns right
    padding = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]).bool()  # keys: 2 cached + 3 new
    causal = torch.ones(3, 5).tril(diagonal=2).bool()
    mask4d = (causal & padding[:, None, :])[:, None]  # [2, 1, 3, 5]
    assert real_token_mask(mask4d, None, past_length=2).tolist() == [[True, True, True], [True, True, False]]
    additive = torch.zeros(2, 1, 3, 5).masked_fill(~mask4d, float("-inf"))
    assert real_token_mask(additive, None, past_length=2).tolist() == [[True, True, True], [True, True, False]]
    assert real_token_mask(torch.ones(2, 1, 4, 3).bool(), ids) is None  # a shape it cannot read: all count


def test_bad_alpha() -> None:
    with pytest.raises(ValueError):
        PESFConfig(alpha=-0.1)
    with pytest.raises(ValueError):
        PESFConfig(alpha=float("nan"))


def reference_block_output(adapter, block, hidden: torch.Tensor, alpha: float, renormalize: bool) -> torch.Tensor:
    """Per-token loop from the adapter's routing and experts, skipping by Python-counted frequencies."""
    batch, seq_len, width = hidden.shape
    flat = hidden.reshape(-1, width)
    routing = adapter.route(block, flat)
    n_experts, top_k = adapter.num_experts(block), routing.indices.shape[-1]
    out = torch.zeros_like(flat)
    for b in range(batch):
        rows = range(b * seq_len, (b + 1) * seq_len)
        counts = [0] * n_experts
        for t in rows:
            for e in routing.indices[t].tolist():
                counts[e] += 1
        kept = {e for e in range(n_experts) if counts[e] >= alpha * seq_len * top_k / n_experts}
        for t in rows:
            slots = [(e, w) for e, w in zip(routing.indices[t].tolist(), routing.weights[t]) if e in kept]
            scale = routing.weights[t].sum() / sum(w for _, w in slots) if renormalize and slots else 1.0
            for e, w in slots:
                out[t] += w * scale * adapter.expert_forward(block, e, flat[t:t + 1])[0]
    shared = adapter.shared_output(block, flat)
    return (out if shared is None else out + shared).reshape(hidden.shape)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_hook_matches_independent_reference(name: str, renormalize: bool) -> None:
    model, adapter = build(name)
    layer = next(layer for layer in adapter.decoder_layers(model) if adapter.moe_block(layer) is not None)
    block = adapter.moe_block(layer)
    hidden = torch.randn(2, 10, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    stats = enable_pesf(model, PESFConfig(alpha=0.8, renormalize=renormalize))
    with torch.no_grad():
        ours = block(hidden)
        ours = ours[0] if isinstance(ours, tuple) else ours
        expected = reference_block_output(adapter, block, hidden, 0.8, renormalize)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert sum(s.skipped_slots for s in stats.values()) > 0  # the case is not vacuous


def test_block_run_alone_after_a_padded_model_call_counts_all_tokens() -> None:
    """The mask of a finished model call is not left behind for the next call of a block on its own."""
    model, adapter = build("mixtral")
    block = next(adapter.moe_block(layer) for layer in adapter.decoder_layers(model)
                 if adapter.moe_block(layer) is not None)
    hidden = torch.randn(2, 10, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    enable_pesf(model, PESFConfig(alpha=0.8))
    ids = calib_ids(2, 10, seed=4)
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask)
        ours = block(hidden)
        expected = reference_block_output(adapter, block, hidden, 0.8, False)
    torch.testing.assert_close(ours[0] if isinstance(ours, tuple) else ours, expected, rtol=1e-5, atol=1e-5)


def test_alpha_zero_and_disable_change_nothing() -> None:
    model, _ = build("mixtral")
    ids = calib_ids(2, 12, seed=4)
    with torch.no_grad():
        base = model(ids).logits
        enable_pesf(model, PESFConfig(alpha=0.0))
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
        enable_pesf(model, PESFConfig(alpha=1.0))
        assert not torch.equal(model(ids).logits, base)
        disable_pesf(model)
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)


def test_grouped_mm_experts_are_refused() -> None:
    model, _ = build("mixtral", experts_implementation="grouped_mm")
    with pytest.raises(ValueError, match="eager"):
        enable_pesf(model, PESFConfig(alpha=0.3))


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_packed_runtime_pesf_matches_in_memory(name: str, tmp_path: Path) -> None:
    model, q = quantize(name, bits=2)
    ids = calib_ids(2, 16, seed=6)
    enable_pesf(model, PESFConfig(alpha=0.5, renormalize=True))
    with torch.no_grad():
        reference = model(ids).logits
    disable_pesf(model)
    out = export(model, q, tmp_path / "out")
    with torch.no_grad():
        plain = load(out)(ids).logits
        via_kwarg = load(out, pesf_alpha=0.5, pesf_renormalize=True)(ids).logits
        config = json.loads((out / "config.json").read_text())
        config["pesf"] = {"enabled": True, "alpha": 0.5, "renormalize": True}
        (out / "config.json").write_text(json.dumps(config))
        via_config = load(out)(ids).logits
    torch.testing.assert_close(via_kwarg, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_config, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, reference)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    model, q = quantize("mixtral", bits=2)
    return export(model, q, tmp_path_factory.mktemp("pesf-options") / "out")


@pytest.mark.parametrize("option, value, message", [
    ("pesf_alhpa", 0.7, "unknown PESF option pesf_alhpa; the valid ones are pesf_alpha, pesf_renormalize"),
    ("pesf_alpha", "abc", "pesf_alpha must be a number >= 0"),
    ("pesf_alpha", -0.3, "pesf_alpha must be a number >= 0"),
    ("pesf_alpha", float("nan"), "pesf_alpha must be a number >= 0"),
    ("pesf_renormalize", "maybe", "pesf_renormalize must be true or false"),
])
def test_bad_pesf_options_are_refused(small_export: Path, option: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load(small_export, **{option: value})


def test_lm_eval_model_args_typo_is_refused(small_export: Path) -> None:
    """The way a user meets it: lm_eval --model hf --model_args ...,pesf_alhpa=0.7."""
    from lm_eval.models.huggingface import HFLM

    from eacmoe.assets import TOKENIZER_DIR

    args = f"pretrained={small_export},tokenizer={TOKENIZER_DIR},trust_remote_code=True,dtype=float32,pesf_alhpa=0.7"
    with pytest.raises(ValueError, match="unknown PESF option pesf_alhpa"):
        HFLM.create_from_arg_string(args, {"batch_size": 1, "device": "cpu"})
    model = HFLM.create_from_arg_string(args.replace("alhpa", "alpha"), {"batch_size": 1, "device": "cpu"}).model
    assert model.pesf_stats  # the correctly spelled option turns PESF on


def test_string_options_as_lm_eval_passes_them(small_export: Path) -> None:
    model = load(small_export, pesf_alpha="0.5", pesf_renormalize="True")
    assert model.pesf_stats
    assert not hasattr(load(small_export, pesf_alpha=0, pesf_renormalize="false"), "pesf_stats")
