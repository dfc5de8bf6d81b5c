"""DeepSeek adapters: DeepSeek-V2 (``DeepseekV2ForCausalLM``, incl. V2-Lite) and DeepSeek-V3 (``DeepseekV3ForCausalLM``,
also Kimi-K2 / Moonlight-style checkpoints that load as ``deepseek_v3``).

Both: Multi-head Latent Attention (``q_proj`` or ``q_a_proj``/``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``,
``o_proj``); the first ``config.first_k_dense_replace`` layers hold a dense ``DeepseekV*MLP`` instead of the MoE
block (``DeepseekV2Moe`` / ``DeepseekV3MoE``); each MoE block adds an ungated ``shared_experts`` MLP
(``moe_intermediate_size * n_shared_experts`` wide) to the routed output. Router logits are computed in fp32
(input and weight upcast) and the combine weights are fp32.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    LinearGroups,
    MoEAdapter,
    Routing,
    WeightSpec,
    gated_mlp_specs,
    linear_specs,
    mlp_linear_groups,
    norm_specs,
)

logger = logging.getLogger(__name__)


def _group_mask(group_scores: Tensor, topk_group: int, num_experts: int) -> Tensor:
    """[T, E] bool mask of the experts inside each token's ``topk_group`` best groups."""
    num_group = group_scores.shape[-1]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, num_group, num_experts // num_group).reshape(-1, num_experts).bool()


class _DeepseekAdapter(MoEAdapter):
    """MLA attention, dense first layers and shared experts, common to V2 and V3."""

    def attention_linears(self, layer: nn.Module) -> LinearGroups:
        attn = layer.self_attn
        # The query projection and the compressed KV projection both read the normed hidden state.
        if attn.q_lora_rank is None:
            first = [("self_attn.q_proj", attn.q_proj)]
            q_up: LinearGroups = []
        else:
            first = [("self_attn.q_a_proj", attn.q_a_proj)]
            q_up = [[("self_attn.q_b_proj", attn.q_b_proj)]]  # reads q_a_layernorm(q_a_proj(x))
        first.append(("self_attn.kv_a_proj_with_mqa", attn.kv_a_proj_with_mqa))
        return [
            first,
            *q_up,
            [("self_attn.kv_b_proj", attn.kv_b_proj)],  # reads kv_a_layernorm(latent part of kv_a)
            [("self_attn.o_proj", attn.o_proj)],
        ]

    def router_logits(self, block: nn.Module, hidden: Tensor, router_weight: Tensor | None = None) -> Tensor:
        weight = self.router_weight(block) if router_weight is None else router_weight
        return F.linear(self.router_input(block, hidden).float(), weight.float())

    def shared_experts(self, block: nn.Module) -> LinearGroups:
        return mlp_linear_groups("mlp.shared_experts", block.shared_experts)

    def shared_output(self, block: nn.Module, hidden: Tensor) -> Tensor:
        return block.shared_experts(hidden)

    # Config fields (parameter inventory): ``n_routed_experts`` experts of width ``moe_intermediate_size``; the
    # first ``first_k_dense_replace`` layers are dense (``intermediate_size``); ``n_shared_experts`` shared experts
    # fused into one MLP ``moe_intermediate_size * n_shared_experts`` wide; MLA attention sized by ``q_lora_rank``,
    # ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim`` (``config.head_dim`` is only the
    # rotary width there). ``_mlp_bias`` says whether the family's MLPs honour ``config.mlp_bias``.
    _mlp_bias_field: bool = False

    def _mlp_bias(self, config: Any) -> bool:
        return bool(getattr(config, "mlp_bias", False)) if self._mlp_bias_field else False

    def config_num_experts(self, config: Any) -> int:
        return int(config.n_routed_experts)

    def config_expert_intermediate_size(self, config: Any) -> int:
        return int(config.moe_intermediate_size)

    def config_is_moe_layer(self, config: Any, layer: int) -> bool:
        # transformers builds the MoE block for every layer >= first_k_dense_replace and ignores moe_layer_freq
        # (1 in every released checkpoint), so this does too.
        if int(getattr(config, "moe_layer_freq", 1) or 1) != 1 and layer == 0:
            logger.warning("moe_layer_freq=%s is ignored, as transformers ignores it", config.moe_layer_freq)
        return layer >= int(config.first_k_dense_replace)

    def config_attention_specs(self, config: Any, layer: int) -> list[WeightSpec]:
        """Multi-head Latent Attention: q_proj (or q_a_proj + q_a_layernorm + q_b_proj), kv_a_proj_with_mqa,
        kv_a_layernorm, kv_b_proj, o_proj; ``attention_bias`` on q_a, kv_a and o only (as transformers)."""
        hidden, heads, bias = config.hidden_size, config.num_attention_heads, bool(config.attention_bias)
        qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        specs: list[WeightSpec] = []
        if config.q_lora_rank is None:
            specs += linear_specs("attention", "self_attn.q_proj", heads * qk_head_dim, hidden, layer)
        else:
            specs += linear_specs("attention", "self_attn.q_a_proj", config.q_lora_rank, hidden, layer, bias=bias)
            specs += norm_specs("self_attn.q_a_layernorm", config.q_lora_rank, layer)
            specs += linear_specs("attention", "self_attn.q_b_proj", heads * qk_head_dim, config.q_lora_rank, layer)
        specs += linear_specs(
            "attention", "self_attn.kv_a_proj_with_mqa", config.kv_lora_rank + config.qk_rope_head_dim, hidden, layer,
            bias=bias,
        )
        specs += norm_specs("self_attn.kv_a_layernorm", config.kv_lora_rank, layer)
        specs += linear_specs(
            "attention", "self_attn.kv_b_proj", heads * (config.qk_nope_head_dim + config.v_head_dim),
            config.kv_lora_rank, layer,
        )
        specs += linear_specs("attention", "self_attn.o_proj", hidden, heads * config.v_head_dim, layer, bias=bias)
        return specs

    def config_shared_expert_specs(self, config: Any, layer: int) -> list[WeightSpec]:
        n_shared = int(getattr(config, "n_shared_experts", 0) or 0)
        if n_shared == 0:
            return []
        return gated_mlp_specs(
            "shared_experts", "mlp.shared_experts", config.hidden_size, config.moe_intermediate_size * n_shared, layer,
            bias=self._mlp_bias(config),
        )

    def config_dense_mlp_specs(self, config: Any, layer: int) -> list[WeightSpec]:
        return gated_mlp_specs(
            "dense_mlp", "mlp", config.hidden_size, config.intermediate_size, layer, bias=self._mlp_bias(config)
        )

    def kv_cache_values_per_token(self, config: Any, layer: int) -> int:
        """MLA caches the compressed latent (``kv_lora_rank``) plus the shared rotary key (``qk_rope_head_dim``)
        per token, not per-head K/V (transformers 5 caches exactly that and expands on the fly)."""
        return int(config.kv_lora_rank + config.qk_rope_head_dim)

    def kv_cache_layout(self, config: Any) -> str:
        return f"MLA latent {config.kv_lora_rank} + rope key {config.qk_rope_head_dim} per token and layer"


class DeepseekV2Adapter(_DeepseekAdapter):
    """DeepSeek-V2 routing (``DeepseekV2TopkRouter``): softmax over all experts (fp32), then

    - ``topk_method == "greedy"``: plain top-k of the probabilities;
    - ``topk_method == "group_limited_greedy"``: keep the ``topk_group`` groups (of ``n_group``) with the highest
      max-probability, zero the others, then top-k;

    and multiply by ``routed_scaling_factor``. No renormalisation: transformers' V2 ignores ``norm_topk_prob``.
    """

    family = "deepseek_v2"
    model_types = ("deepseek_v2",)
    _mlp_bias_field = True  # DeepseekV2MLP uses bias=config.mlp_bias (dense and shared MLPs)

    def route(self, block: nn.Module, hidden: Tensor, router_weight: Tensor | None = None) -> Routing:
        router = block.gate
        logits = self.router_logits(block, hidden, router_weight)
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        num_experts = scores.shape[-1]
        if router.topk_method == "group_limited_greedy":
            group_scores = scores.view(-1, router.num_group, num_experts // router.num_group).max(dim=-1).values
            scores = scores.masked_fill(~_group_mask(group_scores, router.topk_group, num_experts), 0.0)
        elif router.topk_method != "greedy":
            raise ValueError(f"deepseek_v2: unsupported topk_method {router.topk_method!r}")
        weights, indices = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
        return Routing(logits=logits, weights=weights * router.routed_scaling_factor, indices=indices)


class DeepseekV3Adapter(_DeepseekAdapter):
    """DeepSeek-V3 routing (``DeepseekV3TopkRouter``, "noaux_tc"): sigmoid scores; experts are *chosen* on
    ``scores + e_score_correction_bias`` restricted to the ``topk_group`` groups with the largest sum of their two
    best biased scores, but *weighted* by the unbiased sigmoid scores, renormalised if ``norm_topk_prob``
    (+1e-20), times ``routed_scaling_factor``.

    Caveat for router calibration: the selection depends on the correction bias too, so top-k of the raw logits
    is not exactly the model's choice; ``selection_scores`` gives the scores the choice is made on.
    """

    family = "deepseek_v3"
    model_types = ("deepseek_v3",)

    def config_router_specs(self, config: Any, layer: int) -> list[WeightSpec]:
        """The router weight plus its persistent ``e_score_correction_bias`` buffer [E] (saved, not a parameter)."""
        return [
            *super().config_router_specs(config, layer),
            WeightSpec("router", "mlp.gate.e_score_correction_bias", (self.config_num_experts(config),), 1, layer,
                       parameter=False),
        ]

    def selection_scores(self, block: nn.Module, logits: Tensor) -> Tensor:
        """[T, E] scores the experts are ranked by (before the group restriction)."""
        return logits.sigmoid() + block.gate.e_score_correction_bias

    def expert_probabilities(self, block: nn.Module, logits: Tensor) -> Tensor:
        """The unbiased sigmoid scores (what the chosen experts are weighted by), not a softmax."""
        return logits.float().sigmoid()

    def route(self, block: nn.Module, hidden: Tensor, router_weight: Tensor | None = None) -> Routing:
        router = block.gate
        logits = self.router_logits(block, hidden, router_weight)
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias
        num_experts = scores.shape[-1]
        group_scores = choice.view(-1, router.num_group, num_experts // router.num_group).topk(2, dim=-1)[0].sum(-1)
        choice = choice.masked_fill(~_group_mask(group_scores, router.topk_group, num_experts), float("-inf"))
        indices = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(logits=logits, weights=weights * router.routed_scaling_factor, indices=indices)
