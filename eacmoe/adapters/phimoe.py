"""PhiMoE adapter: ``PhimoeForCausalLM`` (Phi-3.5-MoE). Block ``PhimoeSparseMoeBlock`` with ``router:
PhimoeTopKRouter`` (an ``nn.Linear`` subclass, no bias) and fused ``experts: PhimoeExperts``."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import MoEAdapter, Routing, WeightSpec, norm_specs


def _sparsemixer_pick(scores: Tensor, masked: Tensor, jitter_eps: float) -> tuple[Tensor, Tensor]:
    """One eval-mode sparsemixer step: the best expert of ``masked`` and its weight.

    The weight is a softmax restricted to the experts whose relative gap to the best one,
    ``(best - s) / max(|s|, best)`` (measured on the unmasked ``scores``), is at most ``2 * jitter_eps``.
    """
    with torch.no_grad():
        best, index = masked.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=best)
        far = ((best - scores) / factor) > (2 * jitter_eps)
    gates = torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1)
    return gates.gather(dim=-1, index=index), index


class PhimoeAdapter(MoEAdapter):
    """Routing: "sparsemixer" top-2 in eval mode (``modeling_phimoe.sparsemixer(training=False)``): expert 1 is the
    argmax of the logits, weighted by a softmax over the experts within the ``router_jitter_noise`` relative
    margin of it; expert 2 is the argmax with expert 1 masked out, weighted the same way. The weights do not sum
    to one. ``router_jitter_noise`` (default 0.01) acts as that margin in eval mode too; Gumbel sampling and
    ``input_jitter_noise`` only happen in training. Always exactly two experts, whatever ``num_experts_per_tok``.
    """

    family = "phimoe"
    model_types = ("phimoe",)

    def router(self, block: nn.Module) -> nn.Module:
        return block.router

    def top_k(self, block: nn.Module) -> int:
        return 2  # sparsemixer is hard-wired to two experts

    def route(self, block: nn.Module, hidden: Tensor, router_weight: Tensor | None = None) -> Routing:
        router = block.router
        logits = self.router_logits(block, hidden, router_weight)
        eps = router.router_jitter_noise
        w1, i1 = _sparsemixer_pick(logits, logits, eps)
        w2, i2 = _sparsemixer_pick(logits, torch.scatter(logits, -1, i1, float("-inf")), eps)
        return Routing(logits=logits, weights=torch.cat((w1, w2), dim=-1), indices=torch.cat((i1, i2), dim=-1))

    # Config fields (parameter inventory): ``num_local_experts`` experts of width ``intermediate_size``; every
    # layer is MoE; LayerNorms (weight + bias) instead of RMSNorms; ``attention_bias`` on q/k/v/o and
    # ``lm_head_bias`` (both true in Phi-3.5-MoE); the router lives at ``mlp.router``.
    def config_num_experts(self, config: Any) -> int:
        return int(config.num_local_experts)

    def config_expert_intermediate_size(self, config: Any) -> int:
        return int(config.intermediate_size)

    config_router_name = "mlp.router"

    def config_attention_bias(self, config: Any) -> bool:
        return bool(config.attention_bias)

    def config_norm_bias(self, config: Any) -> bool:
        return True  # PhiMoE uses LayerNorm with bias

    def config_final_norm_specs(self, config: Any) -> list[WeightSpec]:
        return norm_specs("model.norm", config.hidden_size, None, bias=True)

    def config_lm_head_specs(self, config: Any) -> list[WeightSpec]:
        specs = super().config_lm_head_specs(config)
        if specs and getattr(config, "lm_head_bias", False):
            specs.append(WeightSpec("lm_head", "lm_head.bias", (config.vocab_size,)))
        return specs
