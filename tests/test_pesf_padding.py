"""PESF is padding-correct: a sequence's output does not depend on what it is batched with, through a forward
with an attention mask (right and left padding), batched greedy ``generate`` with a KV cache, and lm_eval with
``batch_size > 1``; decode steps are untouched. FP eager model (the bundled tiny-mixtral) and packed runtime."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eacmoe.assets import resolve_model
from eacmoe.pesf import PESFConfig, disable_pesf, enable_pesf
from test_export import export, load
from test_pipeline import quantize

torch.set_num_threads(1)

TASKS_DIR = Path(__file__).resolve().parents[1] / "eval" / "tasks"
SHORT, LONG = 24, 64
SETTINGS = [PESFConfig(alpha=a, renormalize=r) for a in (0.3, 0.7) for r in (False, True)]
SETTING_IDS = [f"alpha{c.alpha}-{'renorm' if c.renormalize else 'drop'}" for c in SETTINGS]


@pytest.fixture(scope="module")
def bundled():
    path = resolve_model("tiny-mixtral")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    yield model, AutoTokenizer.from_pretrained(path)
    disable_pesf(model)


@pytest.fixture(scope="module")
def packed_export(tmp_path_factory) -> Path:
    """A tiny random Mixtral quantized to 2 bits and exported (loaded back through the packed runtime, whose
    own copy of eacmoe/pesf.py then runs PESF)."""
    model, q = quantize("mixtral", bits=2)
    return export(model, q, tmp_path_factory.mktemp("pesf-padding") / "packed")


def load_packed(out: Path, config: PESFConfig):
    model = load(out, pesf_alpha=config.alpha, pesf_renormalize=config.renormalize)
    assert any(type(m).__name__ == "PackedExperts" for m in model.modules())
    return model, model.pesf_stats


def random_ids(vocab: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed))  # no pad id 0


def padded_pair(short: torch.Tensor, long: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor | None, slice]:
    """``short`` padded (token 0) to ``long``'s length in a batch with it: ids, attention mask (None for "unmasked",
    lm_eval's way: right padding with 0 and no mask) and the slice of ``short``'s real positions in row 0."""
    n, length = len(short), len(long)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    real = slice(length - n, length) if side == "left" else slice(0, n)
    ids[0, real], mask[0, real] = short, 1
    ids[1], mask[1] = long, 1
    return ids, (None if side == "unmasked" else mask), real


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def slot_totals(stats: dict) -> tuple[int, int, int]:
    return (sum(s.sequences for s in stats.values()), sum(s.slots for s in stats.values()),
            sum(s.skipped_slots for s in stats.values()))


def check_alone_equals_batched(model, stats: dict, side: str) -> None:
    """``model`` runs PESF (``stats``, still zero): a short sequence alone and padded in a batch with a long one."""
    vocab = model.config.vocab_size
    short, long = random_ids(vocab, SHORT, seed=1), random_ids(vocab, LONG, seed=2)
    ids, mask, real = padded_pair(short, long, side)
    with torch.no_grad():
        alone_short = model(short[None]).logits[0]
        alone_long = model(long[None]).logits[0]
        alone_stats = slot_totals(stats)
        batched = model(ids, attention_mask=mask).logits
    assert max_diff(batched[0, real], alone_short) <= 1e-4
    assert max_diff(batched[1], alone_long) <= 1e-4
    # the stats count real tokens only: the batch adds exactly what the two sequences alone added
    sequences, slots, skipped = alone_stats
    assert slot_totals(stats) == (2 * sequences, 2 * slots, 2 * skipped)
    assert skipped > 0  # PESF did skip experts: the case is not vacuous


@pytest.mark.parametrize("side", ["right", "left", "unmasked"])
@pytest.mark.parametrize("config", SETTINGS, ids=SETTING_IDS)
def test_fp_alone_equals_padded_in_batch(bundled, config: PESFConfig, side: str) -> None:
    model, _ = bundled
    try:
        check_alone_equals_batched(model, enable_pesf(model, config), side)
    finally:
        disable_pesf(model)


@pytest.mark.parametrize("side", ["right", "left", "unmasked"])
@pytest.mark.parametrize("config", SETTINGS[1::2], ids=SETTING_IDS[1::2])
def test_packed_alone_equals_padded_in_batch(packed_export: Path, config: PESFConfig, side: str) -> None:
    check_alone_equals_batched(*load_packed(packed_export, config), side)


def test_decoder_called_directly_uses_the_mask(bundled) -> None:
    """The mask is also recorded when the decoder (``model.model``) is entered directly, positionally."""
    model, _ = bundled
    vocab = model.config.vocab_size
    short, long = random_ids(vocab, SHORT, seed=1), random_ids(vocab, LONG, seed=2)
    ids, mask, real = padded_pair(short, long, "right")
    enable_pesf(model, PESFConfig(alpha=0.7))
    try:
        with torch.no_grad():
            alone = model.model(short[None]).last_hidden_state[0]
            batched = model.model(ids, mask).last_hidden_state[0, real]
    finally:
        disable_pesf(model)
    assert max_diff(batched, alone) <= 1e-4


def as_4d(mask: torch.Tensor, past: int) -> torch.Tensor:
    """The bool ``[batch, 1, query, key]`` mask (causal and padding) of a chunk after ``past`` cached tokens, the
    form ``generate`` passes with a static cache."""
    queries = mask.shape[1] - past
    causal = torch.ones(queries, mask.shape[1], dtype=torch.bool).tril(diagonal=past)
    return (causal & mask.bool()[:, None, :])[:, None]


@pytest.mark.parametrize("mask_dims", [2, 4])
def test_prefill_chunk_after_kv_cache_counts_its_own_columns(bundled, mask_dims: int) -> None:
    """A prompt prefilled in two chunks, the second on the KV cache of the first (mask over both): PESF counts the
    real tokens of the chunk itself, the last columns of the mask (a 4-D mask: its diagonal after the cached
    tokens); alone and left-padded in a batch agree."""
    model, _ = bundled
    vocab = model.config.vocab_size
    short, long = random_ids(vocab, 24, seed=7), random_ids(vocab, 40, seed=8)
    ids, mask = left_padded([short, long])  # short: 16 pads, then 24 tokens
    split = 28  # 12 of short's tokens in each chunk
    stats = enable_pesf(model, PESFConfig(alpha=0.7))
    try:
        with torch.no_grad():
            first = model(ids[:, :split], attention_mask=mask[:, :split], use_cache=True)
            before = sum(s.skipped_slots for s in stats.values())
            second_mask = mask if mask_dims == 2 else as_4d(mask, split)
            batched = model(ids[:, split:], attention_mask=second_mask, cache=first.cache).logits
            assert sum(s.skipped_slots for s in stats.values()) > before  # PESF ran on the second chunk
            alone_first = model(short[None, :12], use_cache=True)
            alone_mask = torch.ones(1, 24, dtype=torch.long)
            alone = model(short[None, 12:], attention_mask=alone_mask if mask_dims == 2 else as_4d(alone_mask, 12),
                          cache=alone_first.cache).logits
            long_first = model(long[None, :split], use_cache=True)
            long_alone = model(long[None, split:], cache=long_first.cache).logits
    finally:
        disable_pesf(model)
    assert max_diff(batched[0], alone[0]) <= 1e-4
    assert max_diff(batched[1], long_alone[0]) <= 1e-4


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):], mask[row, length - len(prompt):] = prompt, 1
    return ids, mask


GREEDY = {"do_sample": False, "return_dict_in_generate": True, "output_logits": True}


def greedy(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, **kw):
    # min_new_tokens: no sequence stops early at eos, so batched and alone generate the same number of tokens
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          **GREEDY, **kw)


@pytest.mark.parametrize("cache", ["dynamic", "static"])  # static: generate passes a 4-D mask
@pytest.mark.parametrize("runtime", ["fp", "packed"])
def test_batched_generate_equals_alone(request, runtime: str, cache: str) -> None:
    """Greedy generate of two prompts of different lengths, left-padded in one batch with a KV cache, produces
    each prompt's tokens (and logits) generated alone."""
    config = PESFConfig(alpha=0.7)
    if runtime == "fp":
        model = request.getfixturevalue("bundled")[0]
        stats = enable_pesf(model, config)
    else:
        model, stats = load_packed(request.getfixturevalue("packed_export"), config)
    vocab = model.config.vocab_size
    prompts = [random_ids(vocab, 9, seed=3), random_ids(vocab, 30, seed=4)]
    try:
        with torch.no_grad():
            kw = {"cache_implementation": "static"} if cache == "static" else {}
            batched = greedy(model, *left_padded(prompts), new_tokens=8, **kw)
            alone = [greedy(model, p[None], torch.ones(1, len(p), dtype=torch.long), new_tokens=8, **kw)
                     for p in prompts]
    finally:
        disable_pesf(model)
    assert sum(s.skipped_slots for s in stats.values()) > 0
    for row, single in enumerate(alone):
        assert torch.equal(batched.sequences[row, -8:], single.sequences[0, -8:])
        for step_batched, step_alone in zip(batched.logits, single.logits):
            assert max_diff(step_batched[row], step_alone[0]) <= 1e-4


@pytest.mark.parametrize("alpha", [0.7, 5.0])
def test_decode_steps_through_generate_are_untouched(bundled, alpha: float) -> None:
    """generate with PESF on == the same prefill with PESF on, then decoding from its KV cache with PESF off.
    alpha 5 > N/K would skip every expert of a one-token step if PESF touched decoding."""
    model, tokenizer = bundled
    prompts = [random_ids(len(tokenizer), 12, seed=5), random_ids(len(tokenizer), 20, seed=6)]
    ids, mask = left_padded(prompts)
    new_tokens = 6
    config = PESFConfig(alpha=alpha)
    try:
        with torch.no_grad():
            stats = enable_pesf(model, config)
            full = greedy(model, ids, mask, new_tokens)
            full_sequences = {s.sequences for s in stats.values()}
            enable_pesf(model, config)
            prefill = greedy(model, ids, mask, 1)  # the prefill (PESF on) and its first token
            disable_pesf(model)
            decoded = greedy(model, prefill.sequences, torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1),
                             new_tokens - 1, cache=prefill.cache)
            without = greedy(model, ids, mask, new_tokens)
    finally:
        disable_pesf(model)
    assert full_sequences == {2}  # each layer ran PESF on the prefill of the two prompts only
    assert decoded.logits[0].shape == full.logits[1].shape  # the continuation really decoded from the cache
    torch.testing.assert_close(full.logits[0], prefill.logits[0], rtol=0, atol=0)
    for step_full, step_decoded in zip(full.logits[1:], decoded.logits):
        torch.testing.assert_close(step_full, step_decoded, rtol=0, atol=1e-5)
    assert torch.equal(full.sequences, decoded.sequences)
    assert max_diff(full.logits[0], without.logits[0]) > 1e-2  # PESF did change the prefill


def per_sample_loglikelihoods(model, tokenizer, batch_size: int, task_manager) -> dict[str, list[float]]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    results = simple_evaluate(model=lm, tasks=["eacmoe_cloze", "eacmoe_ppl_brown"], limit=6, log_samples=True,
                              task_manager=task_manager)
    return {task: [float(r[0] if isinstance(r, (list, tuple)) else r) for sample in samples
                   for r in sample["filtered_resps"]]
            for task, samples in results["samples"].items()}


def test_lm_eval_batch_size_8_equals_1(bundled) -> None:
    """lm_eval right-pads loglikelihood batches with token 0 and passes no attention mask: PESF must not count
    the padding (cloze: loglikelihood requests of different lengths; ppl: rolling windows)."""
    from lm_eval.tasks import TaskManager

    model, tokenizer = bundled
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)  # ours only: fast
    enable_pesf(model, PESFConfig(alpha=0.7))
    try:
        one = per_sample_loglikelihoods(model, tokenizer, 1, task_manager)
        eight = per_sample_loglikelihoods(model, tokenizer, 8, task_manager)
    finally:
        disable_pesf(model)
    assert one.keys() == eight.keys() == {"eacmoe_cloze", "eacmoe_ppl_brown"}
    for task in one:
        assert len(one[task]) == len(eight[task]) > 1
        assert max(abs(a - b) for a, b in zip(one[task], eight[task])) <= 1e-4, task
