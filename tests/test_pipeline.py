"""The layer-by-layer QESC pipeline on tiny random models of every supported family."""
from __future__ import annotations

import copy

import pytest
import torch

from eacmoe.expert_shift import change_counts, measure_expert_shift, measure_fp_reference
from eacmoe.pipeline import LayerwiseQuantizer, QuantizeConfig
from tiny_models import FAMILY_NAMES, VOCAB, build

torch.set_num_threads(1)


def calib_ids(n: int = 4, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def quantize(name: str, method: str = "qesc", bits: int | list[int] = 2, progress_dir=None, stop_after_layer=None, resume=False,
             model=None, group_size: int = 8, router_solver: str = "adam"):
    if model is None:
        model, _ = build(name)
    n_layers = len(model.model.layers)
    expert_bits = list(bits) if isinstance(bits, (list, tuple)) else [bits] * n_layers
    cfg = QuantizeConfig(expert_bits=expert_bits, method=method, group_size=group_size, router_steps=20,
                         batch_size=2, router_solver=router_solver)
    q = LayerwiseQuantizer(model, cfg, progress_dir=progress_dir)
    q.run(calib_ids(), resume=resume, stop_after_layer=stop_after_layer)
    return model, q


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_full_qesc_run_every_family(name: str) -> None:
    model, q = quantize(name)
    adapter = q.adapter
    n_experts_quantized = 0
    for i, layer in enumerate(adapter.decoder_layers(model)):
        # every attention Linear holds exactly its dequantized grid values
        for group in adapter.attention_linears(layer):
            for lname, linear in group:
                torch.testing.assert_close(linear.weight.data, q.quantized[f"layers.{i}.{lname}"].dequantize(),
                                           rtol=0, atol=0)
        block = adapter.moe_block(layer)
        if block is None:
            continue
        for e in range(adapter.num_experts(block)):
            for proj, w in adapter.expert_weights(block, e).items():
                qw = q.quantized[f"layers.{i}.mlp.experts.{e}.{proj}"]
                assert qw.codes.max() <= 3
                torch.testing.assert_close(w, qw.dequantize(), rtol=0, atol=0)
                n_experts_quantized += 1
        for group in adapter.shared_experts(block):
            for lname, linear in group:
                assert f"layers.{i}.{lname}" in q.quantized
                torch.testing.assert_close(linear.weight.data, q.quantized[f"layers.{i}.{lname}"].dequantize(),
                                           rtol=0, atol=0)
        # routers are never quantized: not in the quantized set
        assert not any(k.startswith(f"layers.{i}.mlp.gate.") for k in q.quantized)
    assert n_experts_quantized > 0
    logits = model(calib_ids(1)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("router_solver", ["adam", "ridge"])
def test_router_calibration_changes_only_routers_and_lowers_loss(router_solver: str) -> None:
    model, q = quantize("mixtral", router_solver=router_solver)
    for r in q.reports:
        assert r.router["loss_after"] <= r.router["loss_before"]
    assert any(r.router["loss_after"] < r.router["loss_before"] for r in q.reports)


def test_gptq_method_leaves_routers_untouched() -> None:
    model, _ = build("mixtral")
    before = {n: p.clone() for n, p in model.named_parameters() if ".gate." in n}
    quantize("mixtral", method="gptq", model=model)
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def test_same_seed_gives_bit_identical_weights() -> None:
    a, _ = quantize("qwen2_moe")
    b, _ = quantize("qwen2_moe")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_kill_after_layer_then_resume_is_identical(tmp_path) -> None:
    full, _ = quantize("deepseek_v3")
    progress = tmp_path / "progress"
    quantize("deepseek_v3", progress_dir=progress, stop_after_layer=0)   # "crash" after layer 0
    assert (progress / "state.json").exists()
    resumed, q = quantize("deepseek_v3", progress_dir=progress, resume=True)
    assert [r.layer for r in q.reports] == list(range(len(resumed.model.layers)))
    for (na, pa), (_, pb) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(pa, pb), na


def test_rtn_needs_no_data_and_is_on_grid() -> None:
    model, q = quantize("olmoe", method="rtn", bits=3)
    experts = [qw for n, qw in q.quantized.items() if ".experts." in n]
    attention = [qw for n, qw in q.quantized.items() if ".self_attn." in n]
    assert experts and attention
    assert all(qw.bits == 3 and qw.codes.max() <= 7 for qw in experts)
    assert all(qw.bits == 4 and qw.codes.max() <= 15 for qw in attention)
    assert max(qw.codes.max() for qw in experts) == 7  # the grid is used to its full range


def test_change_counts_closed_form() -> None:
    fp = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    qz = torch.tensor([[1, 0], [2, 5], [0, 1], [7, 6]])
    assert change_counts(fp, qz).tolist() == [0, 1, 2, 0]


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


def test_oracle_stream_uses_fp_routing() -> None:
    fp_model, _ = build("mixtral")
    q_model, _ = quantize("mixtral", method="rtn", bits=2)
    report = measure_expert_shift(fp_model, q_model, calib_ids(2), batch_size=1)
    assert any(s["any"] > 0 for s in report.shift)  # 2-bit RTN shifts some routing
    assert report.kl_from_fp["q/q"] > 0


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
