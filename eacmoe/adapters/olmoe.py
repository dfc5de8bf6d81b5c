"""OLMoE adapter: ``OlmoeForCausalLM`` (block ``OlmoeSparseMoeBlock`` with ``gate: OlmoeTopKRouter`` and fused
``experts: OlmoeExperts``)."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import MoEAdapter, Routing, WeightSpec, config_head_dim, linear_specs, norm_specs, softmax_topk


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

    # Config fields (parameter inventory): ``num_experts`` experts of width ``intermediate_size`` (there is no
    # separate moe_intermediate_size); every layer is MoE.
    def config_num_experts(self, config: Any) -> int:
        return int(config.num_experts)

    def config_expert_intermediate_size(self, config: Any) -> int:
        return int(config.intermediate_size)

    def config_attention_specs(self, config: Any, layer: int) -> list[WeightSpec]:
        """q/k/v/o with ``attention_bias`` on all four, and q_norm/k_norm over the whole projection (OLMo style:
        ``hidden_size`` and ``(hidden_size // heads) * kv_heads`` wide, not per head)."""
        hidden, head_dim, bias = config.hidden_size, config_head_dim(config), bool(config.attention_bias)
        q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        return [
            *linear_specs("attention", "self_attn.q_proj", q_out, hidden, layer, bias=bias),
            *linear_specs("attention", "self_attn.k_proj", kv_out, hidden, layer, bias=bias),
            *linear_specs("attention", "self_attn.v_proj", kv_out, hidden, layer, bias=bias),
            *linear_specs("attention", "self_attn.o_proj", hidden, q_out, layer, bias=bias),
            *norm_specs("self_attn.q_norm", hidden, layer),
            *norm_specs("self_attn.k_norm", (hidden // config.num_attention_heads) * config.num_key_value_heads, layer),
        ]
