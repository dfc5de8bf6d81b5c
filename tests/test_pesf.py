"""PESF (prefill expert skipping by selection frequency): the rule on closed-form cases, the hook against an
independent per-token reference built from the adapters, and the packed runtime against the FP path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eacmoe.pesf import PESFConfig, apply_pesf, disable_pesf, enable_pesf, pesf_keep_mask, selection_counts
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
