"""Expert-shift measurement (eacmoe/expert_shift.py): the 2x2 routing table against independent computations.

The references come from the models' own forwards: hooks on each MoE block's fused experts module record the
routing its real router chose (`top_k_index`, `top_k_weights`) or replace it by another model's, which is what
"routing forced" means; perplexity and KL are then computed from the resulting logits."""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from eacmoe.expert_shift import change_counts, measure_expert_shift, measure_fp_reference
from test_pipeline import calib_ids, moe_layers, quantize
from tiny_models import build

torch.set_num_threads(1)
BATCH = 1


@contextlib.contextmanager
def experts_calls(model, adapter, force: dict[int, list] | None = None):
    """Record, per MoE layer, the (indices, weights) every call of its experts module gets; with `force`, replace
    them call by call by the given ones (layer -> list of (indices, weights), consumed in order)."""
    calls: dict[int, list] = {i: [] for i, _ in moe_layers(model, adapter)}
    handles = []
    for i, block in moe_layers(model, adapter):
        def hook(_module, args, i=i):
            hidden, indices, weights = args
            if force is not None:
                indices, weights = force[i][len(calls[i])]
            calls[i].append((indices.clone(), weights.clone()))
            return hidden, indices, weights
        handles.append(adapter.experts(block).register_forward_pre_hook(hook))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def own_forward(model, adapter, ids, force=None):
    """Logits of the model's own forward, one batch of BATCH sequences at a time (as the measurement batches), and
    the routing each MoE layer used."""
    with experts_calls(model, adapter, force) as calls:
        logits = torch.cat([model(ids[s:s + BATCH]).logits for s in range(0, ids.shape[0], BATCH)])
    return logits, calls


def perplexity(logits, ids) -> float:
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).item())


def kl_from(reference_logits, logits) -> float:
    p = reference_logits[:, :-1].float().log_softmax(-1)
    q = logits[:, :-1].float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def shifted_pair():
    """The FP tiny-mixtral and a 2-bit RTN copy of it (routing shifts in every MoE layer), with held-out ids."""
    fp_model, adapter = build("mixtral")
    q_model, _ = quantize("mixtral", method="rtn", bits=2)
    return fp_model, q_model, adapter, calib_ids(3, 16, seed=7)


def test_change_counts_closed_form() -> None:
    fp = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    qz = torch.tensor([[1, 0], [2, 5], [0, 1], [7, 6]])
    assert change_counts(fp, qz).tolist() == [0, 1, 2, 0]


def test_forced_routing_uses_the_other_models_experts(shifted_pair) -> None:
    """In the 2x2 table the quantized model with FP routing forced (q/fp) runs its experts on exactly the experts and
    weights the FP model's own forward picks, and fp/q on the quantized model's; the shift rates are those of the
    two own forwards' indices."""
    fp_model, q_model, adapter, ids = shifted_pair
    _, fp_own = own_forward(fp_model, adapter, ids)
    _, q_own = own_forward(q_model, adapter, ids)
    with experts_calls(fp_model, adapter) as fp_calls, experts_calls(q_model, adapter) as q_calls:
        report = measure_expert_shift(fp_model, q_model, ids, batch_size=BATCH)
    n_batches = ids.shape[0] // BATCH
    shifted = 0
    for i in fp_own:
        # fp/fp (the reference) then, per batch, fp/q; per batch q/q then q/fp
        assert len(fp_calls[i]) == len(q_calls[i]) == 2 * n_batches
        used_fp = {"fp/fp": fp_calls[i][:n_batches], "fp/q": fp_calls[i][n_batches:],
                   "q/q": q_calls[i][0::2], "q/fp": q_calls[i][1::2]}
        expected = {"fp/fp": fp_own[i], "fp/q": q_own[i], "q/q": q_own[i], "q/fp": fp_own[i]}
        for stream, calls in used_fp.items():
            for b, ((indices, weights), (ref_indices, ref_weights)) in enumerate(zip(calls, expected[stream])):
                assert torch.equal(indices, ref_indices), f"layer {i} batch {b}: {stream} used other experts"
                torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6)
        fp_idx = torch.cat([c[0] for c in fp_own[i]])
        q_idx = torch.cat([c[0] for c in q_own[i]])
        changed = change_counts(fp_idx, q_idx)
        shift = next(s for s in report.shift if s["layer"] == i)
        k = fp_idx.shape[-1]
        assert shift["any"] == pytest.approx((changed >= 1).float().mean().item(), abs=1e-7)
        assert shift["all"] == pytest.approx((changed == k).float().mean().item(), abs=1e-7)
        assert shift["half"] == pytest.approx((2 * changed >= k).float().mean().item(), abs=1e-7)
        shifted += int((changed > 0).sum())
    assert shifted > 0  # otherwise forcing could not be told from not forcing


def test_stream_perplexities_and_kl_equal_forced_forwards(shifted_pair) -> None:
    """Each stream's perplexity and KL to FP equal those of the models' own forward, with the routing forced by
    hooks where the stream says so (the oracle q/fp: the quantized model on the FP model's experts)."""
    fp_model, q_model, adapter, ids = shifted_pair
    fp_logits, fp_own = own_forward(fp_model, adapter, ids)
    q_logits, q_own = own_forward(q_model, adapter, ids)
    oracle_logits, _ = own_forward(q_model, adapter, ids, force=fp_own)
    fp_on_q_logits, _ = own_forward(fp_model, adapter, ids, force=q_own)
    report = measure_expert_shift(fp_model, q_model, ids, batch_size=BATCH)
    streams = {"fp/fp": fp_logits, "q/q": q_logits, "q/fp": oracle_logits, "fp/q": fp_on_q_logits}
    ppl = {stream: perplexity(logits, ids) for stream, logits in streams.items()}
    kl = {stream: kl_from(fp_logits, logits) for stream, logits in streams.items() if stream != "fp/fp"}
    for stream in streams:
        assert report.perplexity[stream] == pytest.approx(ppl[stream], rel=1e-5), stream
        if stream != "fp/fp":
            assert report.kl_from_fp[stream] == pytest.approx(kl[stream], rel=1e-3), stream
    # the four streams are told apart by these tolerances (10x): a stream computed with another's routing fails
    for a in streams:
        for b in streams:
            if a < b:
                assert abs(ppl[a] - ppl[b]) > 1e-4 * ppl[a], (a, b)
                if a in kl and b in kl:
                    assert abs(kl[a] - kl[b]) > 1e-2 * kl[a], (a, b)


def test_shift_report_fp_against_itself_is_zero() -> None:
    model, _ = build("mixtral")
    report = measure_expert_shift(model, copy.deepcopy(model), calib_ids(2), batch_size=1)
    assert all(s["any"] == 0 for s in report.shift)
    assert all(abs(v) < 1e-6 for v in report.kl_from_fp.values())
    ppl = report.perplexity
    assert abs(ppl["fp/fp"] - ppl["q/q"]) < 1e-3 * ppl["fp/fp"]
    # the FP stream agrees with the model's own forward (an independent path through transformers)
    ids = calib_ids(2)
    logits = model(ids).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert abs(torch.exp(nll).item() - ppl["fp/fp"]) < 1e-3 * ppl["fp/fp"]


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v2"])  # deepseek_v2: a dense first layer
def test_precomputed_fp_reference_gives_the_same_report(name: str) -> None:
    fp_model, _ = build(name)
    q_model, _ = quantize(name, method="rtn", bits=2)
    ids = calib_ids(3)
    fresh = measure_expert_shift(fp_model, q_model, ids, batch_size=2)
    reference = measure_fp_reference(fp_model, ids, batch_size=2)
    reused = [measure_expert_shift(fp_model, q_model, ids, batch_size=2, reference=reference) for _ in range(2)]
    for report in reused:
        assert report.to_dict() == fresh.to_dict()
    with pytest.raises(ValueError, match="other inputs"):
        measure_expert_shift(fp_model, q_model, calib_ids(3, seed=1), batch_size=2, reference=reference)
