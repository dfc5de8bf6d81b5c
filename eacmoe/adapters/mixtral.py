"""Mixtral adapter: ``MixtralForCausalLM`` / ``MixtralModel`` (transformers 5: ``MixtralSparseMoeBlock`` with
``gate: MixtralTopKRouter`` and fused ``experts: MixtralExperts``)."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import MoEAdapter, Routing, softmax_topk


class MixtralAdapter(MoEAdapter):
    """Routing: softmax over all experts (fp32) -> top-k -> always renormalised.

    The weights stay fp32 (MixtralTopKRouter does not cast them back to the logits' dtype). No shared experts,
    no dense layers. ``router_jitter_noise`` multiplies the block input only in training mode, so eval routing
    is deterministic.
    """

    family = "mixtral"
    model_types = ("mixtral",)

    def route(self, block: nn.Module, hidden: Tensor, router_weight: Tensor | None = None) -> Routing:
        logits = self.router_logits(block, hidden, router_weight)
        weights, indices = softmax_topk(logits.float(), self.top_k(block), normalize=True)
        return Routing(logits=logits, weights=weights, indices=indices)

    # Config fields (parameter inventory): ``num_local_experts`` experts of width ``intermediate_size``; attention
    # without biases, ``head_dim`` or hidden/heads; every layer is MoE; the defaults cover the rest.
    def config_num_experts(self, config: Any) -> int:
        return int(config.num_local_experts)

    def config_expert_intermediate_size(self, config: Any) -> int:
        return int(config.intermediate_size)
