"""Architecture adapters: one per transformers-5 MoE family, looked up by ``config.model_type``.

>>> adapter = get_adapter(model)           # or a config, or a model_type string
>>> for layer in adapter.decoder_layers(model):
...     block = adapter.moe_block(layer)   # None for dense layers
"""
from __future__ import annotations

from typing import Any

from .base import (
    LinearGroups,
    MoEAdapter,
    Routing,
    UnsupportedModelError,
    calibration_topk_rule,
    softmax_topk,
)
from .deepseek import DeepseekV2Adapter, DeepseekV3Adapter
from .mixtral import MixtralAdapter
from .olmoe import OlmoeAdapter
from .phimoe import PhimoeAdapter
from .qwen_moe import Qwen2MoeAdapter, Qwen3MoeAdapter

ADAPTER_CLASSES: tuple[type[MoEAdapter], ...] = (
    MixtralAdapter,
    Qwen2MoeAdapter,
    Qwen3MoeAdapter,
    OlmoeAdapter,
    DeepseekV2Adapter,
    DeepseekV3Adapter,
    PhimoeAdapter,
)

# model_type -> adapter class; the only place that looks at model_type.
_REGISTRY: dict[str, type[MoEAdapter]] = {mt: cls for cls in ADAPTER_CLASSES for mt in cls.model_types}

# MoE families known not to fit the fused-expert interface, with the reason given to the user.
_KNOWN_UNSUPPORTED: dict[str, str] = {
    "gpt_oss": "its router has a bias and its experts are transposed, gate/up-interleaved, biased and use a "
    "clamped SwiGLU, which the per-expert [out, in] views and act(gate)*up interface cannot express",
}

# Config attributes that name the number of routed experts in MoE configs.
_EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def supported_model_types() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _config_of(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "model_type"):
        raise TypeError(f"expected a transformers model, config or model_type string, got {type(model_or_config)!r}")
    return config


def get_adapter(model_or_config: Any) -> MoEAdapter:
    """The adapter for a model, its config, or a ``model_type`` string.

    Raises UnsupportedModelError (a ValueError) for a dense model or an MoE family without an adapter.
    """
    if isinstance(model_or_config, str):
        model_type, config = model_or_config, None
    else:
        config = _config_of(model_or_config)
        model_type = config.model_type
    cls = _REGISTRY.get(model_type)
    if cls is not None:
        return cls()
    supported = ", ".join(f"{c.family} ({'/'.join(c.model_types)})" for c in ADAPTER_CLASSES)
    if model_type in _KNOWN_UNSUPPORTED:
        why = _KNOWN_UNSUPPORTED[model_type]
    elif config is not None and not any(getattr(config, a, None) for a in _EXPERT_COUNT_ATTRS):
        why = "it looks like a dense model (no routed experts in its config)"
    else:
        why = "no adapter is registered for this family"
    raise UnsupportedModelError(f"model_type {model_type!r} is not supported: {why}; supported families: {supported}")


__all__ = [
    "ADAPTER_CLASSES",
    "DeepseekV2Adapter",
    "DeepseekV3Adapter",
    "LinearGroups",
    "MixtralAdapter",
    "MoEAdapter",
    "OlmoeAdapter",
    "PhimoeAdapter",
    "Qwen2MoeAdapter",
    "Qwen3MoeAdapter",
    "Routing",
    "UnsupportedModelError",
    "calibration_topk_rule",
    "get_adapter",
    "softmax_topk",
    "supported_model_types",
]
