"""`--sparse-expert-policy`: which experts count as starved and what they are quantized with (sparse_experts.py).

Checked three ways: each policy's decision and row weights on a hand-made routing against the closed form (who is
under which threshold, the softmax of hand-written logits); GPTQModel's FailSafe boundary against GPTQModel's own
`should_use_fallback`; and one run of the pipeline on a tiny random Mixtral with a starved expert in every MoE layer,
where every expert's Hessian (or RTN codes) must be what the policy says, computed from the quantized model's own
forward (hooks), never from the pipeline's routing."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from eacmoe.adapters import Routing, get_adapter
from eacmoe.expert_hessian import get_expert_hessian
from eacmoe.pipeline import QuantizeConfig, progress_mismatch
from eacmoe.quant import QuantSpec, rtn_quantize
from eacmoe.sparse_experts import SPARSE_EXPERT_POLICIES, LayerRouting, get_sparse_expert_policy, policy_help
from gptqmodel_env import gptqmodel_import_guard
from test_expert_hessian import assert_weighted_hessian, observe_routing
from test_pipeline import RecordingQuantizer, assert_hessian, calib_ids, moe_layers, observe_moe, quantize
from tiny_models import build

torch.set_num_threads(1)

# -- a hand-made routing: 10 tokens, 4 experts, top-2 --------------------------------------------------------------
PAIRS = [(0, 1), (1, 0), (0, 1), (0, 1), (0, 2), (2, 0), (0, 2), (0, 3), (1, 2), (2, 1)]
COUNTS = [8, 6, 5, 1]          # tokens routed to each expert, by counting PAIRS
WIDTH = 5                      # the experts' input width: the default min_expert_tokens
LOGITS = torch.tensor([[0.3, -1.2, 2.0, 0.1], [1.5, 0.2, -0.7, -2.0], [0.0, 0.4, 0.9, -0.3], [2.2, -0.1, 0.3, 0.6],
                       [-0.5, 1.1, 0.8, 0.2], [0.7, 0.7, -1.4, 1.9], [1.0, -0.9, 0.0, 0.5], [-1.3, 0.6, 0.2, 1.2],
                       [0.9, 1.3, -0.2, -0.8], [0.1, -0.4, 1.6, 0.3]])
COMBINE = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.55, 0.45], [0.8, 0.2], [0.65, 0.35], [0.5, 0.5], [0.9, 0.1],
                        [0.6, 0.4], [0.75, 0.25], [0.85, 0.15]])


def hand_routing() -> Routing:
    return Routing(logits=LOGITS, weights=COMBINE, indices=torch.tensor(PAIRS))


def softmax_by_hand(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [v / sum(exps) for v in exps]


def hand_layer(total_tokens: int = len(PAIRS), hessian: str = "routed", min_expert_tokens: int | None = None):
    routing = hand_routing()
    adapter = get_adapter("mixtral")  # a softmax family: expert_probabilities = the softmax over all experts
    return LayerRouting(routing, total_tokens, get_expert_hessian(hessian), min_expert_tokens,
                        lambda: adapter.expert_probabilities(None, routing.logits))


def routed(e: int) -> torch.Tensor:
    return torch.tensor([t for t, pair in enumerate(PAIRS) if e in pair])


def select_all(policy: str, layer: LayerRouting) -> list:
    return [get_sparse_expert_policy(policy).select(e, routed(e), WIDTH, layer) for e in range(len(COUNTS))]


def test_hand_routing_counts() -> None:
    assert [routed(e).numel() for e in range(4)] == COUNTS


@pytest.mark.parametrize("policy", ["pool", "rtn", "weighted-pool"])
@pytest.mark.parametrize(("min_expert_tokens", "sparse"), [(None, [3]), (6, [2, 3]), (5, [3]), (8, [1, 2, 3]),
                                                           (9, [0, 1, 2, 3]), (1, [])])
def test_min_expert_tokens_policies_decide_and_weight_by_the_closed_form(policy: str, min_expert_tokens,
                                                                        sparse) -> None:
    """Under min_expert_tokens (default: the input width 5), strictly: an expert with exactly that many tokens
    keeps its own. A kept expert gets its routed rows, unweighted (routed Hessian); a sparse one RTN (rtn), every
    row unweighted (pool) or every row weighted by softmax(logits)[t, e] (weighted-pool)."""
    chosen = select_all(policy, hand_layer(min_expert_tokens=min_expert_tokens))
    assert [e for e, c in enumerate(chosen) if c.sparse] == sparse
    for e, c in enumerate(chosen):
        if e not in sparse:
            assert not c.rtn and torch.equal(c.token_index, routed(e)) and c.row_weights is None
        elif policy == "rtn":
            assert c.rtn
        else:
            assert not c.rtn and c.token_index is None
            if policy == "pool":
                assert c.row_weights is None
            else:
                expected = torch.tensor([softmax_by_hand(row)[e] for row in LOGITS.tolist()], dtype=torch.float64)
                torch.testing.assert_close(c.row_weights.double(), expected, rtol=1e-6, atol=1e-7)


def test_kept_experts_carry_the_expert_hessian_weights() -> None:
    """With --expert-hessian weighted an expert kept on its own tokens gets its combine weights (from the
    routing's weights column matching the expert), whichever the policy; sparse ones stay as the policy says."""
    for policy in SPARSE_EXPERT_POLICIES:
        chosen = select_all(policy, hand_layer(hessian="weighted", min_expert_tokens=6))
        for e in (0, 1):  # 8 and 6 tokens: kept under every policy here
            expected = [COMBINE[t, PAIRS[t].index(e)].item() for t in routed(e).tolist()]
            torch.testing.assert_close(chosen[e].row_weights, torch.tensor(expected))
        if policy == "weighted-pool":  # the pool's weights are the probabilities, not the combine weights
            assert chosen[3].row_weights.shape == (len(PAIRS),)


# total tokens, tokens of the expert, RTN?: 0.5% of 1000 is 5.0 (5 keeps its tokens), of 1024 is 5.12 (5 is under)
BOUNDARY = [(1000, 4, True), (1000, 5, False), (1024, 5, True), (1024, 6, False), (200, 0, True), (200, 1, False),
            (32768, 163, True), (32768, 164, False)]


@pytest.mark.parametrize(("total", "count", "rtn"), BOUNDARY)
def test_gptqmodel_falls_back_under_half_a_percent_of_the_calibration_tokens(total: int, count: int, rtn: bool) -> None:
    """GPTQModel's threshold is 0.5% of all calibration tokens, strict, whatever --min-expert-tokens says."""
    policy = get_sparse_expert_policy("gptqmodel")
    for min_expert_tokens in (None, 1, 10**9):
        layer = LayerRouting(hand_routing(), total, min_expert_tokens=min_expert_tokens)
        chosen = policy.select(0, torch.arange(count), WIDTH, layer)
        assert (chosen.sparse, chosen.rtn) == (rtn, rtn), (total, count, min_expert_tokens)
    assert not policy.uses_min_expert_tokens


@pytest.mark.parametrize(("total", "count", "rtn"), BOUNDARY)
def test_gptqmodel_boundary_is_gptqmodels_own(total: int, count: int, rtn: bool) -> None:
    """The same decisions from GPTQModel's code: its default Fallback threshold through `should_use_fallback`, with
    the module's sample count and the calibration token total, as GPTQ.quantize calls it."""
    with gptqmodel_import_guard():
        pytest.importorskip("gptqmodel")
        from gptqmodel.quantization.config import Fallback, FallbackStrategy
        from gptqmodel.utils.fallback import should_use_fallback
    fallback = Fallback()
    assert fallback.strategy == FallbackStrategy.RTN and fallback.threshold == "0.5%"
    assert should_use_fallback(fallback, float(count), total) is rtn


def test_every_policy_is_a_choice_with_help_and_validated() -> None:
    from eacmoe.quantize import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "sparse_expert_policy")
    assert tuple(action.choices) == tuple(SPARSE_EXPERT_POLICIES) == ("pool", "rtn", "gptqmodel", "weighted-pool")
    text = parser.format_help()
    assert all(f"{p.name} =" in policy_help() for p in SPARSE_EXPERT_POLICIES.values())
    assert "0.5%" in text and "%%" not in text
    with pytest.raises(ValueError, match="pool, rtn, gptqmodel, weighted-pool"):
        QuantizeConfig(expert_bits=[2], sparse_expert_policy="drop")
    with pytest.raises(ValueError, match="min_expert_tokens"):
        QuantizeConfig(expert_bits=[2], min_expert_tokens=0)
    with pytest.raises(ValueError, match="gptqmodel"):
        get_sparse_expert_policy("GPTQModel")
    ids = calib_ids()
    saved = QuantizeConfig(expert_bits=[2], sparse_expert_policy="pool").fingerprint(ids, "m")
    for policy in ("rtn", "gptqmodel", "weighted-pool"):
        other = QuantizeConfig(expert_bits=[2], sparse_expert_policy=policy).fingerprint(ids, "m")
        assert f"sparse_expert_policy 'pool' -> '{policy}'" in progress_mismatch(saved, other)
    assert progress_mismatch(saved, QuantizeConfig(expert_bits=[2]).fingerprint(ids, "m")) is None


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2_greedy", "deepseek_v3"])
@torch.no_grad()
def test_expert_probabilities_are_what_the_combine_weights_come_from(name: str) -> None:
    """The weighted pool's p_{t,e}, gathered at the experts the model's own forward picked, give that forward's
    combine weights: as they are (no renormalisation), renormalised over the top-k, times the scaling factor."""
    model, adapter = build(name)
    ids = calib_ids(2, 16)
    for i, block in moe_layers(model, adapter):
        obs = observe_routing(model, adapter, ids, 2)[i]
        p = adapter.expert_probabilities(block, adapter.router_logits(block, obs["x"]))
        assert p.shape == (obs["x"].shape[0], adapter.num_experts(block))
        picked = p.gather(1, obs["indices"])
        config = model.config
        if getattr(config, "norm_topk_prob", name == "mixtral"):
            picked = picked / picked.sum(-1, keepdim=True)
        picked = picked * getattr(config, "routed_scaling_factor", 1.0)
        torch.testing.assert_close(picked, obs["weights"].float(), rtol=1e-4, atol=1e-5)


# -- the pipeline on a tiny model with a starved expert ---------------------------------------------------------
RARE_TOKEN = 7


def starved_mixtral():
    """A tiny random Mixtral whose expert 0 gets, in every MoE layer, only the tokens with id RARE_TOKEN: feature 0
    of every embedding is +1 (-1 for RARE_TOKEN), which dominates the block input, and only expert 0's router row
    reads it (-3). With 1024 calibration tokens the other experts get from a handful to ~900 tokens."""
    model, adapter = build("mixtral")
    with torch.no_grad():
        embedding = model.model.embed_tokens.weight
        embedding[:, 0] = 1.0
        embedding[RARE_TOKEN, 0] = -1.0
        for _, block in moe_layers(model, adapter):
            router = adapter.router_weight(block)
            router[:, 0] = 0.0
            router[0, 0] = -3.0
    ids = calib_ids(32, 32)
    ids[ids == RARE_TOKEN] = RARE_TOKEN + 1
    ids[0, 5] = ids[3, 20] = ids[17, 9] = RARE_TOKEN
    return model, ids


@pytest.mark.parametrize("policy", list(SPARSE_EXPERT_POLICIES))
@torch.no_grad()
def test_pipeline_quantizes_each_expert_as_its_policy_says(policy: str) -> None:
    """Every expert of every MoE layer, against the closed form from the quantized model's own forward (block input
    x [T, H], the experts its router picked): kept experts have 2 X_e^T X_e / n_e over their routed tokens; sparse
    ones (fewer than the input width 64 tokens; under GPTQModel's rule fewer than 0.5% of T) are RTN (rtn,
    gptqmodel), 2 X^T X / T over all tokens (pool) or 2/T sum_t p_te x_t x_t^T with p = softmax(x W_router^T)
    (weighted-pool), down_proj likewise on its input from the quantized gate and up. Every branch is reached."""
    model, ids = starved_mixtral()
    fp = copy.deepcopy(model)
    model, q = quantize("mixtral", method="gptq", model=model, ids=ids, attn_bits=None,
                        quantizer_class=RecordingQuantizer, sparse_expert_policy=policy)
    adapter = q.adapter
    seen = observe_moe(model, adapter, ids, q.config.batch_size)
    spec = QuantSpec(bits=2, group_size=8)
    branches = set()
    for (i, block), (_, fp_block) in zip(moe_layers(model, adapter), moe_layers(fp, adapter)):
        x, indices = seen[i]["x"], seen[i]["indices"]
        total = x.shape[0]
        counts = [int((indices == e).any(-1).sum()) for e in range(adapter.num_experts(block))]
        assert counts[0] == 3 and q.reports[i].expert_tokens == counts
        threshold = 0.005 * total if policy == "gptqmodel" else x.shape[1]
        sparse = [e for e, c in enumerate(counts) if c < threshold]
        assert q.reports[i].sparse_experts == sparse
        p = torch.softmax(F.linear(x, adapter.router_weight(block)).double(), dim=-1)
        for e, count in enumerate(counts):
            prefix = f"layers.{i}.mlp.experts.{e}"
            if e not in sparse:
                branches.add("own" if count >= x.shape[1] else "own, under the input width")
                xe = x[(indices == e).any(-1)]
                assert_hessian(q.hessians[f"{prefix}.gate_proj"], xe, prefix)
                assert_hessian(q.hessians[f"{prefix}.down_proj"], adapter.expert_intermediate(block, e, xe), prefix)
            elif policy in ("rtn", "gptqmodel"):
                branches.add("rtn")
                for proj, w in adapter.expert_weights(fp_block, e).items():
                    assert q.hessians[f"{prefix}.{proj}"] is None
                    assert torch.equal(q.quantized[f"{prefix}.{proj}"].codes, rtn_quantize(w, spec).codes)
            elif policy == "pool":
                branches.add("pool")
                assert_hessian(q.hessians[f"{prefix}.up_proj"], x, prefix)
                assert_hessian(q.hessians[f"{prefix}.down_proj"], adapter.expert_intermediate(block, e, x), prefix)
            else:
                branches.add("weighted pool")
                assert_weighted_hessian(q.hessians[f"{prefix}.gate_proj"], x, p[:, e], prefix)
                assert_weighted_hessian(q.hessians[f"{prefix}.down_proj"], adapter.expert_intermediate(block, e, x),
                                        p[:, e], prefix)
    expected = {"pool": {"own", "pool"}, "rtn": {"own", "rtn"}, "weighted-pool": {"own", "weighted pool"},
                "gptqmodel": {"own", "rtn", "own, under the input width"}}[policy]
    assert branches == expected


@pytest.mark.parametrize(("name", "score"), [("qwen2_moe", "softmax"), ("deepseek_v3", "sigmoid")])
@torch.no_grad()
def test_weighted_pool_uses_the_familys_own_expert_scores(name: str, score: str) -> None:
    """Every expert pooled (min_expert_tokens huge): its Hessians weight all T tokens of the layer by the family's
    score of the expert, by hand from the block input and the router weight: a softmax over all experts (Qwen2-MoE),
    DeepSeek-V3's unbiased sigmoid (no softmax, no correction bias)."""
    ids = calib_ids(4, 32)
    model, q = quantize(name, method="gptq", ids=ids, attn_bits=None, quantizer_class=RecordingQuantizer,
                        sparse_expert_policy="weighted-pool", min_expert_tokens=10**9)
    adapter = q.adapter
    seen = observe_moe(model, adapter, ids, q.config.batch_size)
    for i, block in moe_layers(model, adapter):
        x = seen[i]["x"]
        logits = x.double() @ adapter.router_weight(block).double().T
        p = torch.softmax(logits, dim=-1) if score == "softmax" else torch.sigmoid(logits)
        assert q.reports[i].sparse_experts == list(range(adapter.num_experts(block)))
        for e in range(adapter.num_experts(block)):
            prefix = f"layers.{i}.mlp.experts.{e}"
            assert_weighted_hessian(q.hessians[f"{prefix}.up_proj"], x, p[:, e], prefix)
