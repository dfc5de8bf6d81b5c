"""Architecture adapters against tiny random transformers-5 MoE models (CPU, fp32, eval mode, eager experts).

Every check compares the adapter with what the model itself does, observed through forward hooks on the fused
experts module (the indices/weights the block really used) and on the router (its logits).
"""
from __future__ import annotations

import logging
import types
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    GptOssConfig,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from eacmoe.adapters import (
    ADAPTER_CLASSES,
    MoEAdapter,
    UnsupportedModelError,
    calibration_topk_rule,
    get_adapter,
)

logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB, HIDDEN = 128, 64
COMMON = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
    intermediate_size=96, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
MLA = dict(COMMON, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


@dataclass(frozen=True)
class Spec:
    """A tiny model of one family; ``dense_layers`` hold no MoE block, ``gates`` are Linear gates never quantized."""

    make_config: Callable[[], object]
    dense_layers: tuple[int, ...] = ()
    gates: tuple[str, ...] = ()


SPECS: dict[str, Spec] = {
    "mixtral": Spec(lambda: MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": Spec(
        lambda: Qwen2MoeConfig(
            **COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False,
        ),
        dense_layers=(1,), gates=("mlp.shared_expert_gate",),
    ),
    "qwen3_moe": Spec(
        lambda: Qwen3MoeConfig(
            **COMMON, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, decoder_sparse_step=2,
            norm_topk_prob=True,
        ),
        dense_layers=(0, 2),  # (i + 1) % decoder_sparse_step != 0
    ),
    "olmoe": Spec(lambda: OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "deepseek_v2": Spec(
        lambda: DeepseekV2Config(
            **MLA, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
            routed_scaling_factor=1.5,
        ),
        dense_layers=(0,),
    ),
    "deepseek_v2_greedy": Spec(
        lambda: DeepseekV2Config(
            **MLA, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=2,
            first_k_dense_replace=0, q_lora_rank=24, topk_method="greedy", routed_scaling_factor=1.0,
        ),
    ),
    "deepseek_v3": Spec(
        lambda: DeepseekV3Config(
            **MLA, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5,
            norm_topk_prob=True,
        ),
        dense_layers=(0,),
    ),
    "phimoe": Spec(lambda: PhimoeConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2)),
    "phimoe_wide_margin": Spec(
        lambda: PhimoeConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.3)
    ),
}
FAMILY_NAMES = sorted(SPECS)


def build(name: str, seed: int = 0, experts_implementation: str = "eager") -> tuple[nn.Module, MoEAdapter]:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(SPECS[name].make_config())
    model.set_experts_implementation(experts_implementation)
    model.eval()
    adapter = get_adapter(model)
    with torch.no_grad():
        for layer in adapter.decoder_layers(model):
            block = adapter.moe_block(layer)
            if block is None:
                continue
            # Larger router weights than the 0.02 init, so routing varies strongly across tokens.
            adapter.router_weight(block).normal_(std=0.3)
            gate = getattr(block, "gate", None)
            if hasattr(gate, "e_score_correction_bias"):  # make the DeepSeek-V3 selection bias matter
                gate.e_score_correction_bias.normal_(std=0.1)
    return model, adapter


def token_ids(seed: int = 1, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def moe_blocks(model: nn.Module, adapter: MoEAdapter) -> list[tuple[int, nn.Module]]:
    blocks = [(i, adapter.moe_block(layer)) for i, layer in enumerate(adapter.decoder_layers(model))]
    return [(i, b) for i, b in blocks if b is not None]


def observe(model: nn.Module, adapter: MoEAdapter, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, dict]]:
    """Run the model; record, per MoE layer, the block input, the router logits and the experts' call arguments."""
    seen: dict[int, dict] = {}
    handles = []
    for i, block in moe_blocks(model, adapter):
        rec = seen.setdefault(i, {})
        handles.append(block.register_forward_pre_hook(lambda m, args, rec=rec: rec.update(block_in=args[0].clone())))
        handles.append(
            adapter.router(block).register_forward_hook(lambda m, args, out, rec=rec: rec.update(logits=out[0]))
        )
        handles.append(
            adapter.experts(block).register_forward_pre_hook(
                lambda m, args, rec=rec: rec.update(indices=args[1].clone(), weights=args[2].clone())
            )
        )
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen


# ---------------------------------------------------------------------------------------------- (1) routing
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_route_matches_model_forward(name: str) -> None:
    model, adapter = build(name)
    _, seen = observe(model, adapter, token_ids())
    assert seen, "no MoE layer found"
    for i, block in moe_blocks(model, adapter):
        with torch.no_grad():
            r = adapter.route(block, seen[i]["block_in"])
        assert r.indices.dtype == torch.int64
        assert r.indices.shape == r.weights.shape == (24, adapter.top_k(block))
        assert r.logits.shape == (24, adapter.num_experts(block))
        torch.testing.assert_close(r.logits, seen[i]["logits"], rtol=0, atol=0)
        assert torch.equal(r.indices, seen[i]["indices"]), f"layer {i}: other experts than the model's"
        torch.testing.assert_close(r.weights, seen[i]["weights"], rtol=0, atol=0)
        # Routing is not degenerate: several experts used, per-token choices distinct.
        assert r.indices.unique().numel() >= 3
        assert all(row.unique().numel() == row.numel() for row in r.indices)


# ---------------------------------------------------------------------------------------------- (2) block output
@pytest.mark.parametrize("experts_implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_moe_forward_equals_block(name: str, experts_implementation: str) -> None:
    model, adapter = build(name, experts_implementation=experts_implementation)
    _, seen = observe(model, adapter, token_ids())
    for i, block in moe_blocks(model, adapter):
        h = seen[i]["block_in"]
        with torch.no_grad():
            expected = block(h)
            out = adapter.moe_forward(block, h, adapter.route(block, h))
            flat = h.reshape(-1, HIDDEN)
            out_flat = adapter.moe_forward(block, flat, adapter.route(block, flat))
        assert out.shape == h.shape and out_flat.shape == flat.shape
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(out_flat, expected.reshape(-1, HIDDEN), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_route_and_moe_forward_bitwise_in_bf16(name: str) -> None:
    """Dtype handling (fp32 softmax, casts back or not, DeepSeek's fp32 logits) matches the model bit for bit."""
    model, adapter = build(name)
    model.to(torch.bfloat16)
    _, seen = observe(model, adapter, token_ids())
    for i, block in moe_blocks(model, adapter):
        h = seen[i]["block_in"]
        with torch.no_grad():
            r = adapter.route(block, h)
            assert r.logits.dtype == seen[i]["logits"].dtype and torch.equal(r.logits, seen[i]["logits"])
            assert r.weights.dtype == seen[i]["weights"].dtype and torch.equal(r.weights, seen[i]["weights"])
            assert torch.equal(r.indices, seen[i]["indices"])
            assert torch.equal(adapter.moe_forward(block, h, r), block(h))


# ---------------------------------------------------------------------------------------------- (3) whole model
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_model_logits_unchanged_with_adapter_forward(name: str) -> None:
    model, adapter = build(name)
    ids = token_ids(seed=2, batch=2, seq=16)
    with torch.no_grad():
        expected = model(ids).logits
    calls = []
    for _, block in moe_blocks(model, adapter):
        def forward(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return adapter.moe_forward(self, hidden, adapter.route(self, hidden))

        block.forward = types.MethodType(forward, block)
    with torch.no_grad():
        got = model(ids).logits
    assert len(calls) == len(moe_blocks(model, adapter)) > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_layer_by_layer_pieces_reproduce_logits(name: str) -> None:
    """embed_tokens / rotary_emb / decoder_layers / final_norm are enough to run the model one layer at a time."""
    model, adapter = build(name)
    ids = token_ids(seed=3)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        expected = model(ids).logits
        h = adapter.embed_tokens(model)(ids)
        position_embeddings = adapter.rotary_emb(model)(h, pos)
        for layer in adapter.decoder_layers(model):  # sdpa with attention_mask=None is causal
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=position_embeddings)
        got = model.lm_head(adapter.final_norm(model)(h))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- (4) expert views
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_expert_weights_views_and_round_trip(name: str) -> None:
    model, adapter = build(name)
    _, seen = observe(model, adapter, token_ids())
    i, block = moe_blocks(model, adapter)[-1]
    experts = adapter.experts(block)
    num_experts, inter = adapter.num_experts(block), adapter.intermediate_size(block)
    e = int(torch.bincount(seen[i]["indices"].flatten(), minlength=num_experts).argmax())

    views = adapter.expert_weights(block, e)
    assert set(views) == {"gate_proj", "up_proj", "down_proj"}
    assert views["gate_proj"].shape == views["up_proj"].shape == (inter, HIDDEN)
    assert views["down_proj"].shape == (HIDDEN, inter)
    for key, fused in (("gate_proj", experts.gate_up_proj), ("up_proj", experts.gate_up_proj),
                       ("down_proj", experts.down_proj)):
        assert views[key].untyped_storage().data_ptr() == fused.untyped_storage().data_ptr(), "not a view"

    # Round trip: set -> get returns the new values, only expert e's slices change, restoring restores.
    before = {"gate_up": experts.gate_up_proj.detach().clone(), "down": experts.down_proj.detach().clone()}
    original = {k: v.detach().clone() for k, v in views.items()}
    new = {k: torch.randn_like(v) for k, v in original.items()}
    adapter.set_expert_weights(block, e, new)
    for k, v in adapter.expert_weights(block, e).items():
        assert torch.equal(v, new[k])
    others = [x for x in range(num_experts) if x != e]
    assert torch.equal(experts.gate_up_proj[others], before["gate_up"][others])
    assert torch.equal(experts.down_proj[others], before["down"][others])
    assert torch.equal(experts.gate_up_proj[e], torch.cat([new["gate_proj"], new["up_proj"]]))
    adapter.set_expert_weights(block, e, original)
    assert torch.equal(experts.gate_up_proj, before["gate_up"]) and torch.equal(experts.down_proj, before["down"])
    with pytest.raises(ValueError):
        adapter.set_expert_weights(block, e, {"down_proj": torch.zeros(3, 3)})
    with pytest.raises(KeyError):
        adapter.set_expert_weights(block, e, {"w1": original["gate_proj"]})

    # Zeroing expert e's down_proj changes exactly the tokens routed to e, by weight_e * expert_e(x).
    h = seen[i]["block_in"]
    flat = h.reshape(-1, HIDDEN)
    with torch.no_grad():
        routing = adapter.route(block, h)
        expected_contrib = adapter.expert_forward(block, e, flat)  # uses the adapter's (original) views
        out = block(h).reshape(-1, HIDDEN)
        adapter.set_expert_weights(block, e, {"down_proj": torch.zeros_like(original["down_proj"])})
        out_zeroed = block(h).reshape(-1, HIDDEN)
    hit = (routing.indices == e)
    routed = hit.any(dim=-1)
    assert 0 < int(routed.sum()) < flat.shape[0]
    assert torch.equal(out_zeroed[~routed], out[~routed])
    weight_e = (routing.weights * hit).sum(dim=-1, keepdim=True)
    torch.testing.assert_close((out - out_zeroed)[routed], (weight_e * expected_contrib)[routed], rtol=1e-4,
                               atol=1e-6)
    assert adapter.expert_act(block) is experts.act_fn


# ---------------------------------------------------------------------------------------------- (5) router override
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_route_with_router_weight_override(name: str) -> None:
    model, adapter = build(name)
    _, seen = observe(model, adapter, token_ids())
    i, block = moe_blocks(model, adapter)[-1]
    h = seen[i]["block_in"]
    weight = adapter.router_weight(block)
    assert isinstance(weight, nn.Parameter) and weight.shape == (adapter.num_experts(block), HIDDEN)
    original = weight.detach().clone()
    new_w = original + 0.3 * torch.randn_like(original)

    with torch.no_grad():
        r_override = adapter.route(block, h, router_weight=new_w)
        r_original = adapter.route(block, h)
    assert torch.equal(adapter.router_weight(block), original), "override must not touch the module"
    assert not torch.equal(r_override.indices, r_original.indices), "perturbation too small to test anything"

    with torch.no_grad():
        adapter.router_weight(block).copy_(new_w)
        r_copied = adapter.route(block, h)
    assert torch.equal(r_override.indices, r_copied.indices)
    torch.testing.assert_close(r_override.weights, r_copied.weights, rtol=0, atol=0)
    torch.testing.assert_close(r_override.logits, r_copied.logits, rtol=0, atol=0)

    # Gradients reach an override weight through the logits (what router calibration trains).
    trainable = new_w.clone().requires_grad_(True)
    adapter.route(block, h.detach(), router_weight=trainable).logits.square().sum().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0
    assert torch.equal(adapter.router_input(block, h), h.reshape(-1, HIDDEN))


# ---------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_layer_structure(name: str) -> None:
    """Dense layers are where the config puts them; every Linear of a layer is in exactly one GPTQ group unless it
    is a router or a gate; names resolve relative to the layer; the members of a group read the same input."""
    spec = SPECS[name]
    model, adapter = build(name)
    layers = adapter.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    inputs: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(id(mod), args[0]))
               for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(token_ids())
    for h in handles:
        h.remove()

    for i, layer in enumerate(layers):
        block = adapter.moe_block(layer)
        assert (block is None) == (i in spec.dense_layers), f"layer {i}"
        groups = adapter.attention_linears(layer) + adapter.dense_mlp_linears(layer)
        if block is None:
            assert adapter.dense_mlp_linears(layer)
        else:
            assert adapter.dense_mlp_linears(layer) == []
            groups += adapter.shared_experts(block)
        listed = [(n, m) for g in groups for n, m in g]
        for n, m in listed:
            assert isinstance(m, nn.Linear) and layer.get_submodule(n) is m, n
        for g in groups:
            for _, m in g[1:]:
                assert inputs[id(m)] is inputs[id(g[0][1])] or torch.equal(inputs[id(m)], inputs[id(g[0][1])])
        not_quantized = {id(layer.get_submodule(g)) for g in spec.gates if block is not None}
        if block is not None:
            not_quantized.add(id(adapter.router(block)))
        all_linears = {id(m) for m in layer.modules() if isinstance(m, nn.Linear)}
        assert len({id(m) for _, m in listed}) == len(listed), "a Linear listed twice"
        assert {id(m) for _, m in listed} == all_linears - not_quantized


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_expert_counts_and_calibration_k(name: str) -> None:
    model, adapter = build(name)
    for _, block in moe_blocks(model, adapter):
        E, k = adapter.num_experts(block), adapter.top_k(block)
        assert E == adapter.experts(block).gate_up_proj.shape[0] == adapter.router_weight(block).shape[0]
        assert k < adapter.default_calibration_topk(block) <= E


def test_calibration_topk_rule_matches_paper() -> None:
    assert calibration_topk_rule(16, 2) == 8  # Phi-3.5-MoE
    assert calibration_topk_rule(64, 6) == 20  # DeepSeek-MoE-16B
    assert calibration_topk_rule(64, 4) == 20  # Qwen1.5-MoE (60 experts: also 20)
    assert calibration_topk_rule(60, 4) == 20
    assert calibration_topk_rule(8, 2) == 4  # Mixtral
    assert calibration_topk_rule(128, 8) == 20 and calibration_topk_rule(4, 2) == 4


# ---------------------------------------------------------------------------------------------- (6) registry
def test_registry_lookup() -> None:
    model, _ = build("mixtral")
    assert get_adapter(model).family == "mixtral"
    assert get_adapter(model.model).decoder_layers(model.model) is model.model.layers
    assert get_adapter(model.config).family == "mixtral"
    for cls in ADAPTER_CLASSES:
        for mt in cls.model_types:
            assert isinstance(get_adapter(mt), cls)


@pytest.mark.parametrize(
    "target, model_type",
    [
        (lambda: AutoModelForCausalLM.from_config(LlamaConfig(**COMMON)), "llama"),
        (lambda: LlamaConfig(**COMMON), "llama"),
        (lambda: GptOssConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2), "gpt_oss"),
        (lambda: "my_new_moe", "my_new_moe"),
    ],
)
def test_unsupported_models_raise(target: Callable[[], object], model_type: str) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        get_adapter(target())
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message and repr(model_type) in message
    for cls in ADAPTER_CLASSES:
        assert cls.family in message
