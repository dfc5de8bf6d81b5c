"""Abstract MoE architecture adapter and the helpers shared by the family adapters.

An adapter hides every family-specific detail of a transformers-5 MoE model (attribute names, routing rule,
shared experts, dense layers) behind one interface, so that the compression pipeline never branches on
``model_type``. All transformers-5 MoE families store their routed experts fused, as 3D parameters
``experts.gate_up_proj`` [E, 2I, H] (gate rows first) and ``experts.down_proj`` [E, H, I]; the defaults below
work on that layout and on the common Llama-style decoder layer (``self_attn.{q,k,v,o}_proj``, ``mlp``).

Conventions:
- Every module name returned by an adapter (``attention_linears``, ``dense_mlp_linears``, ``shared_experts``)
  is relative to the decoder layer, e.g. ``"self_attn.q_proj"`` or ``"mlp.shared_experts.down_proj"``, so
  ``layer.get_submodule(name)`` resolves it and ``f"model.layers.{i}.{name}"`` is its checkpoint prefix.
- Routers and shared-expert gates are never listed in GPTQ groups: they stay in original precision.
- ``route`` reproduces the model's *eval-mode* routing (jitter noise and sampling only exist in training).
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

LinearGroups = list[list[tuple[str, nn.Linear]]]

# Name of the MLP / MoE block inside every supported decoder layer.
MLP_ATTR = "mlp"
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


class UnsupportedModelError(ValueError):
    """Raised for a model without an adapter (a dense model, or an MoE family that is not supported)."""


@dataclass
class Routing:
    """The routing decision of one MoE block for T tokens.

    logits:  [T, E] raw router logits (the router Linear's output, before softmax / sigmoid).
    weights: [T, k] the combine weights the model's own forward multiplies the expert outputs with.
    indices: [T, k] the selected experts (int64), aligned with ``weights``.
    """

    logits: Tensor
    weights: Tensor
    indices: Tensor


def calibration_topk_rule(num_experts: int, top_k: int) -> int:
    """Router-calibration K for the TopK-MSE loss: ``min(E, max(2*k, min(E // 2, 20)))``.

    Reproduces the EAC-MoE paper's choices: 16 experts / top-2 -> 8 (Phi-3.5-MoE); 64 (or 60) experts /
    top-4 or top-6 -> 20 (Qwen1.5-MoE, DeepSeek-MoE-16B); and gives 8 experts / top-2 -> 4 (Mixtral-like).
    K stays well above top-k (K == top-k overfits) and below E (K == E is plain MSE, which is worse).
    """
    return min(num_experts, max(2 * top_k, min(num_experts // 2, 20)))


def softmax_topk(logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """Softmax (in fp32) -> top-k -> optional renormalisation; returns fp32 (weights, indices).

    The rule shared by Mixtral (always renormalised), Qwen2/3-MoE and OLMoE (renormalised iff norm_topk_prob).
    Top-k of the probabilities is taken (not of the logits) exactly as those routers do, so ties resolve alike.
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def mlp_linear_groups(prefix: str, mlp: nn.Module) -> LinearGroups:
    """GPTQ groups of a gated MLP with ``gate_proj``/``up_proj``/``down_proj`` Linears: [[gate, up], [down]]."""
    return [
        [(f"{prefix}.gate_proj", mlp.gate_proj), (f"{prefix}.up_proj", mlp.up_proj)],
        [(f"{prefix}.down_proj", mlp.down_proj)],
    ]


class MoEAdapter(ABC):
    """Family-independent view of a transformers-5 MoE causal LM, layer by layer.

    Subclasses set ``family`` and ``model_types`` and implement ``route``; the defaults cover the common
    layout and are overridden where a family differs.
    """

    family: str = ""
    model_types: tuple[str, ...] = ()

    # ------------------------------------------------------------------ model-level pieces
    @staticmethod
    def _backbone(model: nn.Module) -> nn.Module:
        """The decoder stack (``XModel``) of an ``XForCausalLM`` or of the stack itself."""
        if hasattr(model, "layers"):
            return model
        base = getattr(model, "base_model", None)
        if base is not None and hasattr(base, "layers"):
            return base
        return model.model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self._backbone(model).layers

    def embed_tokens(self, model: nn.Module) -> nn.Module:
        return self._backbone(model).embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self._backbone(model).norm

    def rotary_emb(self, model: nn.Module) -> nn.Module:
        return self._backbone(model).rotary_emb

    # ------------------------------------------------------------------ attention / dense MLP
    def attention_linears(self, layer: nn.Module) -> LinearGroups:
        """[[q, k, v], [o]] for standard multi-head attention (q/k/v share the normed hidden state)."""
        attn = layer.self_attn
        return [
            [("self_attn.q_proj", attn.q_proj), ("self_attn.k_proj", attn.k_proj), ("self_attn.v_proj", attn.v_proj)],
            [("self_attn.o_proj", attn.o_proj)],
        ]

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The sparse MoE block of ``layer``, or None for a dense layer."""
        mlp = getattr(layer, MLP_ATTR)
        return mlp if self.is_moe_block(mlp) else None

    def is_moe_block(self, module: nn.Module) -> bool:
        return hasattr(module, "experts")

    def dense_mlp_linears(self, layer: nn.Module) -> LinearGroups:
        """GPTQ groups of a dense (non-MoE) layer's MLP; [] for an MoE layer."""
        if self.moe_block(layer) is not None:
            return []
        return mlp_linear_groups(MLP_ATTR, getattr(layer, MLP_ATTR))

    # ------------------------------------------------------------------ router
    def router(self, block: nn.Module) -> nn.Module:
        """The router module (the one holding the [E, H] weight)."""
        return block.gate

    def router_weight(self, block: nn.Module) -> nn.Parameter:
        return self.router(block).weight

    def router_input(self, block: nn.Module, hidden: Tensor) -> Tensor:
        """What the router Linear is applied to: the block input flattened to [T, H]."""
        return hidden.reshape(-1, hidden.shape[-1])

    def router_logits(self, block: nn.Module, hidden: Tensor, router_weight: Tensor | None = None) -> Tensor:
        """[T, E] raw logits, computed the way the family's router computes them (dtype included)."""
        weight = self.router_weight(block) if router_weight is None else router_weight
        return F.linear(self.router_input(block, hidden), weight, getattr(self.router(block), "bias", None))

    def selection_scores(self, block: nn.Module, logits: Tensor) -> Tensor:
        """[T, E] scores the family ranks experts by; the raw logits unless a family overrides it (the
        TopK-MSE target set of router calibration is the top-K of these)."""
        return logits

    @abstractmethod
    def route(self, block: nn.Module, hidden: Tensor, router_weight: Tensor | None = None) -> Routing:
        """Exactly the experts and combine weights the model's eval-mode forward picks for ``hidden``.

        ``router_weight`` replaces the block's router weight for this call (the module is not touched), which
        is how a re-calibrated router is evaluated. Gradients flow from ``logits`` (and, where the family's
        rule is differentiable, ``weights``) to ``router_weight``.
        """

    def num_experts(self, block: nn.Module) -> int:
        return int(self.experts(block).num_experts)

    def top_k(self, block: nn.Module) -> int:
        return int(self.router(block).top_k)

    def default_calibration_topk(self, block: nn.Module) -> int:
        """Router-calibration K, see ``calibration_topk_rule``."""
        return calibration_topk_rule(self.num_experts(block), self.top_k(block))

    # ------------------------------------------------------------------ routed experts
    def experts(self, block: nn.Module) -> nn.Module:
        return block.experts

    def intermediate_size(self, block: nn.Module) -> int:
        return self.experts(block).gate_up_proj.shape[1] // 2

    def expert_weights(self, block: nn.Module, e: int) -> dict[str, Tensor]:
        """Views (sharing storage with the fused tensors) of expert ``e`` in nn.Linear orientation [out, in]."""
        experts = self.experts(block)
        inter = self.intermediate_size(block)
        gate_up = experts.gate_up_proj[e]  # [2I, H], gate rows first
        return {"gate_proj": gate_up[:inter], "up_proj": gate_up[inter:], "down_proj": experts.down_proj[e]}

    @torch.no_grad()
    def set_expert_weights(self, block: nn.Module, e: int, weights: dict[str, Tensor]) -> None:
        """Write (a subset of) ``gate_proj``/``up_proj``/``down_proj`` of expert ``e`` into the fused tensors."""
        views = self.expert_weights(block, e)
        unknown = set(weights) - set(views)
        if unknown:
            raise KeyError(f"unknown expert projection(s) {sorted(unknown)}; expected a subset of {EXPERT_PROJS}")
        for name, value in weights.items():
            if tuple(value.shape) != tuple(views[name].shape):
                raise ValueError(f"{name} of expert {e}: shape {tuple(value.shape)} != {tuple(views[name].shape)}")
            views[name].copy_(value)

    def expert_act(self, block: nn.Module) -> Callable[[Tensor], Tensor]:
        """Activation applied to the gate projection: expert(x) = down(act(gate(x)) * up(x))."""
        return self.experts(block).act_fn

    def expert_intermediate(self, block: nn.Module, e: int, x: Tensor) -> Tensor:
        """act(gate(x)) * up(x) of expert ``e`` for x [N, H]: the input of its down_proj."""
        w = self.expert_weights(block, e)
        return self.expert_act(block)(F.linear(x, w["gate_proj"])) * F.linear(x, w["up_proj"])

    def expert_forward(self, block: nn.Module, e: int, x: Tensor) -> Tensor:
        """Unweighted output of expert ``e`` for x [N, H]."""
        return F.linear(self.expert_intermediate(block, e, x), self.expert_weights(block, e)["down_proj"])

    # ------------------------------------------------------------------ shared experts / block forward
    def shared_experts(self, block: nn.Module) -> LinearGroups:
        """GPTQ groups of the always-active shared expert(s); [] if the family has none."""
        return []

    def shared_output(self, block: nn.Module, hidden: Tensor) -> Tensor | None:
        """The shared-expert contribution (gate applied) for hidden [T, H]; None if the family has none."""
        return None

    def moe_forward(self, block: nn.Module, hidden: Tensor, routing: Routing) -> Tensor:
        """The block output for ``hidden`` ([B, S, H] or [T, H]) under ``routing``.

        Uses the block's own fused experts module (whatever ``config._experts_implementation`` selects), so it
        equals ``block(hidden)`` when ``routing == route(block, hidden)``.
        """
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])
        out = self.experts(block)(flat, routing.indices, routing.weights)
        shared = self.shared_output(block, flat)
        if shared is not None:
            out = out + shared
        return out.reshape(shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, model_types={self.model_types})"
