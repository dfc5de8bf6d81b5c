"""Mixtral adapter: ``MixtralForCausalLM`` / ``MixtralModel`` (transformers 5: ``MixtralSparseMoeBlock`` with
``gate: MixtralTopKRouter`` and fused ``experts: MixtralExperts``)."""
from __future__ import annotations

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
