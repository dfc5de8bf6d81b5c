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

import torch
from torch import Tensor, nn

from .base import LinearGroups, MoEAdapter, Routing, mlp_linear_groups, softmax_topk


class _QwenRoutingMixin:
    """Routing rule shared by Qwen2-MoE and Qwen3-MoE (and identical to OLMoE's)."""

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
        return torch.sigmoid(block.shared_expert_gate(hidden)) * block.shared_expert(hidden)


class Qwen3MoeAdapter(_QwenRoutingMixin, MoEAdapter):
    """Qwen3-MoE: routed experts only (q_norm/k_norm in attention do not change the GPTQ groups)."""

    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
