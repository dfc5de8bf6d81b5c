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
from math import prod
from typing import Any

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


# ---------------------------------------------------------------------------------------------------------------
# Parameter inventory from a config alone (no weights): what `python -m eacmoe.plan` sizes.

# Components of a model, in the order the planner reports them.
COMPONENTS = (
    "embeddings", "attention", "router", "routed_experts", "shared_experts", "dense_mlp", "norms", "lm_head",
)
# Components whose Linear weights GPTQ quantizes (attention at the attention bits, the rest at the layer's
# expert bits); routers/gates, norms, embeddings and lm_head stay in 16-bit.
QUANTIZABLE_COMPONENTS = ("attention", "routed_experts", "shared_experts", "dense_mlp")


@dataclass(frozen=True)
class WeightSpec:
    """One kind of weight tensor of a model, as far as the config tells (used for parameter counts and sizing).

    component: one of ``COMPONENTS``.
    name:      checkpoint-style name relative to the decoder layer (``"self_attn.q_proj.weight"``, per-expert
               ``"mlp.experts.gate_proj"``) or to the model for model-level tensors.
    shape:     the tensor shape; Linear weights are ``(out_features, in_features)``. Fused 3D expert tensors are
               listed as their per-expert Linear views (``gate_proj``/``up_proj`` [I, H], ``down_proj`` [H, I]),
               the unit a GPTQ checkpoint stores, with ``copies`` = number of experts.
    copies:    how many identical tensors this entry stands for (experts of one layer).
    layer:     decoder layer index, None for model-level tensors (embeddings, final norm, lm_head).
    linear:    a Linear weight that GPTQ may quantize (component in ``QUANTIZABLE_COMPONENTS``); biases are not.
    parameter: False for a persistent buffer that is saved but is not an ``nn.Parameter`` (not counted as a
               parameter, but it takes memory), e.g. DeepSeek-V3's ``e_score_correction_bias``.
    """

    component: str
    name: str
    shape: tuple[int, ...]
    copies: int = 1
    layer: int | None = None
    linear: bool = False
    parameter: bool = True

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"unknown component {self.component!r}; expected one of {COMPONENTS}")
        if self.linear and (len(self.shape) != 2 or self.component not in QUANTIZABLE_COMPONENTS):
            raise ValueError(f"{self.name}: only 2-D weights of {QUANTIZABLE_COMPONENTS} can be quantizable Linears")

    @property
    def numel(self) -> int:
        """Elements of all ``copies`` together."""
        return prod(self.shape) * self.copies


def linear_specs(
    component: str, name: str, out_features: int, in_features: int, layer: int | None, *, bias: bool = False,
    copies: int = 1, quantizable: bool = True,
) -> list[WeightSpec]:
    """The weight (and optional bias) of one Linear; ``quantizable=False`` for routers and gates."""
    specs = [WeightSpec(component, f"{name}.weight", (out_features, in_features), copies, layer, linear=quantizable)]
    if bias:
        specs.append(WeightSpec(component, f"{name}.bias", (out_features,), copies, layer))
    return specs


def gated_mlp_specs(
    component: str, prefix: str, hidden: int, intermediate: int, layer: int | None, *, bias: bool = False,
    copies: int = 1,
) -> list[WeightSpec]:
    """``gate_proj``/``up_proj`` [I, H] and ``down_proj`` [H, I] of a SwiGLU MLP (or of ``copies`` experts)."""
    return [
        *linear_specs(component, f"{prefix}.gate_proj", intermediate, hidden, layer, bias=bias, copies=copies),
        *linear_specs(component, f"{prefix}.up_proj", intermediate, hidden, layer, bias=bias, copies=copies),
        *linear_specs(component, f"{prefix}.down_proj", hidden, intermediate, layer, bias=bias, copies=copies),
    ]


def norm_specs(name: str, width: int, layer: int | None, *, bias: bool = False) -> list[WeightSpec]:
    """An RMSNorm weight (``bias=True``: a LayerNorm's weight and bias)."""
    specs = [WeightSpec("norms", f"{name}.weight", (width,), 1, layer)]
    if bias:
        specs.append(WeightSpec("norms", f"{name}.bias", (width,), 1, layer))
    return specs


def get_model_type(config: Any) -> str | None:
    """``config.model_type`` (None for an object without one)."""
    return getattr(config, "model_type", None)


def config_head_dim(config: Any) -> int:
    """Attention head width: ``config.head_dim`` when set, else ``hidden_size // num_attention_heads``."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


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

    def post_attention_norm(self, layer: nn.Module) -> nn.Module:
        """The norm between attention and the MLP / MoE block. A decoder layer computes ``h = x + attn(norm(x))``,
        then ``h + mlp(post_attention_norm(h))``: with the norm's input ``h`` (the residual) and output captured,
        the layer's output needs only the block (`layer_output`), not a second pass through attention."""
        return layer.post_attention_layernorm

    def layer_output(self, layer: nn.Module, residual: Tensor, block_input: Tensor) -> Tensor:
        """The decoder layer's output from its residual ``h`` and the norm's output (the block input), both
        [B, S, H], as the layer's own forward computes it: ``h + mlp(block_input)``."""
        out = getattr(layer, MLP_ATTR)(block_input)
        return residual + (out[0] if isinstance(out, tuple) else out)

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

    def expert_probabilities(self, block: nn.Module, logits: Tensor) -> Tensor:
        """[T, E] the router's probability of each expert for each token, before any top-k: the softmax over all
        experts (fp32) unless a family scores experts otherwise (sparse_experts.py's weighted pool uses it)."""
        return torch.softmax(logits, dim=-1, dtype=torch.float32)

    @abstractmethod
    def route(self, block: nn.Module, hidden: Tensor, router_weight: Tensor | None = None) -> Routing:
        """Exactly the experts and combine weights the model's eval-mode forward picks for ``hidden``.

        ``router_weight`` replaces the block's router weight for this call (the module is not touched), which
        is how a re-calibrated router is evaluated. Callers run it without autograd (router calibration computes
        its gradient in closed form, eacmoe/router_calibration.py).
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

    def shared_expert_gate(self, block: nn.Module, hidden: Tensor) -> Tensor | None:
        """[T, 1] factor the block multiplies the shared expert's output by for hidden [T, H]; None when the family
        has no shared expert or adds it ungated (DeepSeek)."""
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

    # ------------------------------------------------------------------ parameter inventory from a config
    # Everything below reads only the config (a transformers PretrainedConfig of this family), so models can be
    # sized without weights. The defaults describe the common Llama-style MoE layout; each family overrides the
    # config fields it names differently (expert count, expert width, dense layers, biases, norms, MLA).
    def config_num_experts(self, config: Any) -> int:
        """Routed experts per MoE layer, from the family's config field."""
        raise NotImplementedError(f"{type(self).__name__} does not read the expert count from a config")

    def config_expert_intermediate_size(self, config: Any) -> int:
        """Intermediate width of one routed expert."""
        raise NotImplementedError(f"{type(self).__name__} does not read the expert width from a config")

    def config_is_moe_layer(self, config: Any, layer: int) -> bool:
        """Whether decoder layer ``layer`` holds the sparse MoE block (else a dense MLP)."""
        return True

    # Families differ here only in biases and the router's attribute name (PhiMoE overrides these three).
    config_router_name = "mlp.gate"

    def config_attention_bias(self, config: Any) -> bool:
        return False

    def config_norm_bias(self, config: Any) -> bool:
        return False

    def config_attention_specs(self, config: Any, layer: int) -> list[WeightSpec]:
        """Standard (grouped-query) attention: q/k/v/o, biased if the family says so."""
        hidden, head_dim, bias = config.hidden_size, config_head_dim(config), self.config_attention_bias(config)
        q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        return [
            *linear_specs("attention", "self_attn.q_proj", q_out, hidden, layer, bias=bias),
            *linear_specs("attention", "self_attn.k_proj", kv_out, hidden, layer, bias=bias),
            *linear_specs("attention", "self_attn.v_proj", kv_out, hidden, layer, bias=bias),
            *linear_specs("attention", "self_attn.o_proj", hidden, q_out, layer, bias=bias),
        ]

    def config_layer_norm_specs(self, config: Any, layer: int) -> list[WeightSpec]:
        """The two per-layer norms (input and post-attention)."""
        bias = self.config_norm_bias(config)
        return [
            *norm_specs("input_layernorm", config.hidden_size, layer, bias=bias),
            *norm_specs("post_attention_layernorm", config.hidden_size, layer, bias=bias),
        ]

    def config_router_specs(self, config: Any, layer: int) -> list[WeightSpec]:
        """The router weight [E, H] (never quantized)."""
        return linear_specs(
            "router", self.config_router_name, self.config_num_experts(config), config.hidden_size, layer,
            quantizable=False,
        )

    def config_routed_expert_specs(self, config: Any, layer: int) -> list[WeightSpec]:
        """The routed experts of an MoE layer, per expert: gate/up [I, H], down [H, I]."""
        return gated_mlp_specs(
            "routed_experts", "mlp.experts", config.hidden_size, self.config_expert_intermediate_size(config), layer,
            copies=self.config_num_experts(config),
        )

    def config_shared_expert_specs(self, config: Any, layer: int) -> list[WeightSpec]:
        """Always-active shared expert(s) of an MoE layer (and their gates); none by default."""
        return []

    def config_dense_mlp_specs(self, config: Any, layer: int) -> list[WeightSpec]:
        """The MLP of a dense (non-MoE) layer, ``intermediate_size`` wide."""
        return gated_mlp_specs("dense_mlp", "mlp", config.hidden_size, config.intermediate_size, layer)

    def config_final_norm_specs(self, config: Any) -> list[WeightSpec]:
        return norm_specs("model.norm", config.hidden_size, None)

    def config_lm_head_specs(self, config: Any) -> list[WeightSpec]:
        """The output projection; none when tied to the embeddings (the tied matrix is stored once)."""
        if getattr(config, "tie_word_embeddings", False):
            return []
        return [WeightSpec("lm_head", "lm_head.weight", (config.vocab_size, config.hidden_size))]

    def weight_inventory(self, config: Any) -> list[WeightSpec]:
        """Every weight tensor (and persistent buffer) of the model described by ``config``, grouped by kind."""
        if get_model_type(config) not in self.model_types:
            raise ValueError(f"{type(self).__name__} sizes {self.model_types} configs, got {get_model_type(config)!r}")
        specs = [WeightSpec("embeddings", "model.embed_tokens.weight", (config.vocab_size, config.hidden_size))]
        for layer in range(config.num_hidden_layers):
            specs += self.config_attention_specs(config, layer)
            specs += self.config_layer_norm_specs(config, layer)
            if self.config_is_moe_layer(config, layer):
                specs += self.config_router_specs(config, layer)
                specs += self.config_routed_expert_specs(config, layer)
                specs += self.config_shared_expert_specs(config, layer)
            else:
                specs += self.config_dense_mlp_specs(config, layer)
        specs += self.config_final_norm_specs(config)
        specs += self.config_lm_head_specs(config)
        return specs

    def count_parameters(self, config: Any) -> int:
        """Number of parameters of the model ``config`` describes (= ``sum(p.numel() for p in model.parameters())``
        of a model built from it; persistent buffers are not parameters)."""
        return sum(spec.numel for spec in self.weight_inventory(config) if spec.parameter)

    def kv_cache_values_per_token(self, config: Any, layer: int) -> int:
        """Cached values per token in decoder layer ``layer``: keys and values of every KV head (GQA-aware)."""
        return 2 * config.num_key_value_heads * config_head_dim(config)

    def kv_cache_layout(self, config: Any) -> str:
        """One-line description of what ``kv_cache_values_per_token`` counts, for reports."""
        kv_heads, heads = config.num_key_value_heads, config.num_attention_heads
        kind = "MHA" if kv_heads == heads else f"GQA, {heads} query heads"
        return f"K+V of {kv_heads} KV heads x {config_head_dim(config)} ({kind})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, model_types={self.model_types})"
