"""Qwen MoE adapters.

- Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): ``Qwen2MoeForCausalLM``; block ``Qwen2MoeSparseMoeBlock`` with
  ``gate: Qwen2MoeTopKRouter``, fused ``experts``, one ``shared_expert`` (``Qwen2MoeMLP``) scaled by
  ``sigmoid(shared_expert_gate(x))``.
- Qwen3-MoE: ``Qwen3MoeForCausalLM``; block ``Qwen3MoeSparseMoeBlock`` (``gate`` + ``experts``, no shared expert).

Both use softmax (fp32) -> top-k -> renormalise only if ``norm_topk_prob``, and cast the weights back to the
logits' dtype. Layers listed in ``config.mlp_only_layers``, or with ``(i + 1) % decoder_sparse_step != 0``, hold a
dense ``Qwen*MoeMLP`` instead of the sparse block: ``moe_block`` returns None there and ``dense_mlp_linears``
lists its gate/up/down projections.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import (
    LinearGroups,
    MoEAdapter,
    Routing,
    WeightSpec,
    config_head_dim,
    gated_mlp_specs,
    linear_specs,
    mlp_linear_groups,
    norm_specs,
    softmax_topk,
)


def _qwen_is_moe_layer(config: Any, layer: int) -> bool:
    """Qwen2/3-MoE decoder layers hold the sparse block unless listed in ``mlp_only_layers`` or skipped by
    ``decoder_sparse_step`` (the rule of ``Qwen*MoeDecoderLayer.__init__``)."""
    return (
        layer not in (getattr(config, "mlp_only_layers", None) or [])
        and config.num_experts > 0
        and (layer + 1) % config.decoder_sparse_step == 0
    )


def _qwen_attention_specs(config: Any, layer: int, qkv_bias: bool, o_bias: bool) -> list[WeightSpec]:
    hidden, head_dim = config.hidden_size, config_head_dim(config)
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return [
        *linear_specs("attention", "self_attn.q_proj", q_out, hidden, layer, bias=qkv_bias),
        *linear_specs("attention", "self_attn.k_proj", kv_out, hidden, layer, bias=qkv_bias),
        *linear_specs("attention", "self_attn.v_proj", kv_out, hidden, layer, bias=qkv_bias),
        *linear_specs("attention", "self_attn.o_proj", hidden, q_out, layer, bias=o_bias),
    ]


class _QwenRoutingMixin:
    """Routing rule and config fields shared by Qwen2-MoE and Qwen3-MoE (the rule is identical to OLMoE's)."""

    def config_num_experts(self, config: Any) -> int:
        return int(config.num_experts)

    def config_expert_intermediate_size(self, config: Any) -> int:
        return int(config.moe_intermediate_size)

    def config_is_moe_layer(self, config: Any, layer: int) -> bool:
        return _qwen_is_moe_layer(config, layer)

    def route(self, block: nn.Module, hidden: Tensor, router_weight: Tensor | None = None) -> Routing:
        router = block.gate
        logits = self.router_logits(block, hidden, router_weight)
        weights, indices = softmax_topk(logits, router.top_k, normalize=bool(router.norm_topk_prob))
        return Routing(logits=logits, weights=weights.to(logits.dtype), indices=indices)


class Qwen2MoeAdapter(_QwenRoutingMixin, MoEAdapter):
    """Qwen2-MoE: routed experts plus a sigmoid-gated shared expert."""

    family = "qwen2_moe"
    model_types = ("qwen2_moe",)

    def shared_experts(self, block: nn.Module) -> LinearGroups:
        # shared_expert_gate ([1, H] Linear) is a gate, like the router: never quantized, so not listed.
        return mlp_linear_groups("mlp.shared_expert", block.shared_expert)

    def shared_output(self, block: nn.Module, hidden: Tensor) -> Tensor:
        return self.shared_expert_gate(block, hidden) * block.shared_expert(hidden)

    def shared_expert_gate(self, block: nn.Module, hidden: Tensor) -> Tensor:
        return torch.sigmoid(block.shared_expert_gate(hidden))

    # Config fields (parameter inventory): ``num_experts`` experts of width ``moe_intermediate_size``; dense
    # layers (``mlp_only_layers`` / ``decoder_sparse_step``) ``intermediate_size`` wide; one shared expert
    # ``shared_expert_intermediate_size`` wide plus its [1, H] gate; ``qkv_bias`` on q/k/v (not o).
    def config_attention_specs(self, config: Any, layer: int) -> list[WeightSpec]:
        return _qwen_attention_specs(config, layer, qkv_bias=bool(config.qkv_bias), o_bias=False)

    def config_shared_expert_specs(self, config: Any, layer: int) -> list[WeightSpec]:
        return [
            *gated_mlp_specs(
                "shared_experts", "mlp.shared_expert", config.hidden_size, config.shared_expert_intermediate_size, layer
            ),
            *linear_specs("router", "mlp.shared_expert_gate", 1, config.hidden_size, layer, quantizable=False),
        ]


class Qwen3MoeAdapter(_QwenRoutingMixin, MoEAdapter):
    """Qwen3-MoE: routed experts only (q_norm/k_norm in attention do not change the GPTQ groups)."""

    family = "qwen3_moe"
    model_types = ("qwen3_moe",)

    # Config fields (parameter inventory): ``num_experts`` experts of width ``moe_intermediate_size``; dense
    # layers as in Qwen2-MoE; ``attention_bias`` on q/k/v/o; per-head q_norm/k_norm (``head_dim`` wide).
    def config_attention_specs(self, config: Any, layer: int) -> list[WeightSpec]:
        bias = bool(config.attention_bias)
        head_dim = config_head_dim(config)
        return [
            *_qwen_attention_specs(config, layer, qkv_bias=bias, o_bias=bias),
            *norm_specs("self_attn.q_norm", head_dim, layer),
            *norm_specs("self_attn.k_norm", head_dim, layer),
        ]
