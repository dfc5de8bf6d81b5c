"""`--expert-hessian weighted`: each expert's GPTQ Hessian is 2/n sum_t g_{t,e} x_t x_t^T over the tokens routed
to it, with g the combine weight the quantized model's own block multiplies the expert's output by; the shared
expert's Hessians carry its gate. Checked against the closed form computed from what the model's forward does
(observed through hooks), never from the pipeline's own routing."""
from __future__ import annotations

import pytest
import torch

from eacmoe.expert_hessian import EXPERT_HESSIANS, get_expert_hessian, weighted_rows
from eacmoe.pipeline import QuantizeConfig
from tiny_models import FAMILY_NAMES
from test_pipeline import (
    RecordingQuantizer,
    calib_ids,
    moe_layers,
    observe_linear_inputs,
    quantize,
    run_with_hooks,
)

torch.set_num_threads(1)


def weighted_hessian(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """2/n sum_t g_t x_t x_t^T, n = rows of x, by its definition (fp64)."""
    x, g = x.double(), g.double()
    return 2.0 * (x * g[:, None]).T @ x / x.shape[0]


def assert_weighted_hessian(recorded, x: torch.Tensor, g: torch.Tensor, what: str) -> None:
    assert recorded is not None, f"{what}: quantized without a Hessian"
    h, n = recorded
    assert n == x.shape[0], f"{what}: Hessian of {n} tokens, expected {x.shape[0]} (n = tokens routed)"
    expected = weighted_hessian(x, g)
    torch.testing.assert_close(h.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=what)


@torch.no_grad()
def observe_routing(model, adapter, ids: torch.Tensor, batch_size: int) -> dict[int, dict[str, torch.Tensor]]:
    """Per MoE layer, in the model's own forward: the block input [T, H], the experts its router picked and the
    combine weights its experts module is called with (the `top_k_weights` argument), and the shared expert's
    gate sigmoid(shared_expert_gate(x)) where the block has one."""
    seen: dict[int, dict[str, list]] = {}
    handles = []
    for i, block in moe_layers(model, adapter):
        rec = seen.setdefault(i, {"x": [], "indices": [], "weights": [], "shared_gate": []})
        handles.append(block.register_forward_pre_hook(
            lambda m, args, rec=rec: rec["x"].append(args[0].reshape(-1, args[0].shape[-1]).clone())))
        def experts_call(m, args, rec=rec):  # returns None: a pre-hook's return value would replace the args
            rec["indices"].append(args[1].clone())
            rec["weights"].append(args[2].clone())
        handles.append(adapter.experts(block).register_forward_pre_hook(experts_call))
        gate = getattr(block, "shared_expert_gate", None)
        if gate is not None:
            handles.append(gate.register_forward_hook(
                lambda m, args, out, rec=rec: rec["shared_gate"].append(torch.sigmoid(out).reshape(-1).clone())))
    run_with_hooks(model, ids, batch_size, handles)
    return {i: {k: torch.cat(v) for k, v in rec.items() if v} for i, rec in seen.items()}


FAMILIES = FAMILY_NAMES


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_weighted_expert_hessian_is_the_routing_weighted_closed_form(name: str) -> None:
    ids = calib_ids(32, 32)
    model, q = quantize(name, ids=ids, quantizer_class=RecordingQuantizer, expert_hessian="weighted")
    adapter = q.adapter
    seen = observe_routing(model, adapter, ids, q.config.batch_size)
    linear_inputs = observe_linear_inputs(model, adapter, ids, q.config.batch_size)
    spread = []
    for i, block in moe_layers(model, adapter):
        report, obs = q.reports[i], seen[i]
        assert report.sparse_experts == [], "an expert took the pooled fallback: this test needs more tokens"
        x, indices, weights = obs["x"], obs["indices"], obs["weights"]
        for e in range(adapter.num_experts(block)):
            routed = (indices == e).any(-1)
            g = (weights.float() * (indices == e)).sum(-1)[routed]  # this expert's column of the combine weights
            spread.append(float(g.std()))
            xe = x[routed]
            prefix = f"layers.{i}.mlp.experts.{e}"
            assert_weighted_hessian(q.hessians[f"{prefix}.gate_proj"], xe, g, f"{prefix}.gate_proj")
            assert_weighted_hessian(q.hessians[f"{prefix}.up_proj"], xe, g, f"{prefix}.up_proj")
            assert_weighted_hessian(q.hessians[f"{prefix}.down_proj"], adapter.expert_intermediate(block, e, xe), g,
                                    f"{prefix}.down_proj")
        for group in adapter.shared_experts(block):
            for rel, _ in group:
                key = f"layers.{i}.{rel}"
                gate = obs.get("shared_gate")
                g = torch.ones(linear_inputs[key].shape[0]) if gate is None else gate
                assert_weighted_hessian(q.hessians[key], linear_inputs[key], g, key)
    # the weights vary from token to token, so the closed form above tells weighted from unweighted
    assert max(spread) > 0.05


@torch.no_grad()
def test_mixtral_combine_weights_are_the_renormalised_top2_softmax_by_hand() -> None:
    """The weights the test above takes from the block are Mixtral's rule, computed here from the router by hand:
    softmax over the 8 logits, the 2 largest, divided by their sum."""
    ids = calib_ids(8, 32)
    model, q = quantize("mixtral", ids=ids, expert_hessian="weighted")
    seen = observe_routing(model, q.adapter, ids, q.config.batch_size)
    for i, block in moe_layers(model, q.adapter):
        x, indices, weights = seen[i]["x"], seen[i]["indices"], seen[i]["weights"]
        probs = torch.softmax(x.double() @ block.gate.weight.double().T, dim=-1)
        top = probs.gather(1, indices)
        torch.testing.assert_close(weights.double(), top / top.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_routed_and_weighted_differ_only_in_the_expert_hessians() -> None:
    """Same seed: attention is quantized identically; the experts are not (a weighted Hessian changes them)."""
    _, routed = quantize("qwen2_moe", ids=calib_ids(16, 32))
    _, weighted = quantize("qwen2_moe", ids=calib_ids(16, 32), expert_hessian="weighted")
    first_attention = "layers.0.self_attn.q_proj"
    assert torch.equal(routed.quantized[first_attention].codes, weighted.quantized[first_attention].codes)
    experts = [k for k in routed.quantized if k.startswith("layers.0.mlp.experts.")]
    assert any(not torch.equal(routed.quantized[k].codes, weighted.quantized[k].codes) for k in experts)


def test_weighted_rows_closed_form_and_variants() -> None:
    x = torch.randn(5, 3, dtype=torch.float64)
    g = torch.rand(5, dtype=torch.float64)
    rows = weighted_rows(x, g)
    torch.testing.assert_close(rows.T @ rows, (x * g[:, None]).T @ x)
    assert weighted_rows(x, None) is x
    assert set(EXPERT_HESSIANS) == {"routed", "weighted"}
    with pytest.raises(ValueError, match="routed, weighted"):
        get_expert_hessian("uniform")
    with pytest.raises(ValueError, match="expert_hessian"):
        QuantizeConfig(expert_bits=[2], expert_hessian="uniform")
