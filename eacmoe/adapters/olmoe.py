"""OLMoE adapter: ``OlmoeForCausalLM`` (block ``OlmoeSparseMoeBlock`` with ``gate: OlmoeTopKRouter`` and fused
``experts: OlmoeExperts``)."""
from __future__ import annotations

from torch import Tensor, nn

from .base import MoEAdapter, Routing, softmax_topk


class OlmoeAdapter(MoEAdapter):
    """Routing: softmax (fp32) -> top-k -> renormalise only if ``norm_topk_prob`` (False in OLMoE-1B-7B), weights
    cast back to the logits' dtype. Attention applies q_norm/k_norm (and optional clip_qkv) after q/k/v_proj,
    which does not change the GPTQ groups. No shared experts, no dense layers.
    """

    family = "olmoe"
    model_types = ("olmoe",)

    def route(self, block: nn.Module, hidden: Tensor, router_weight: Tensor | None = None) -> Routing:
        router = block.gate
        logits = self.router_logits(block, hidden, router_weight)
        weights, indices = softmax_topk(logits, router.top_k, normalize=bool(router.norm_topk_prob))
        return Routing(logits=logits, weights=weights.to(logits.dtype), indices=indices)
