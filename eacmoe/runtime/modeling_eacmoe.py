"""The model class behind an exported eacmoe checkpoint (loaded through ``auto_map`` / ``trust_remote_code``).

    model = AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)
    lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True,dtype=float32 ...

config.json is the original model's config (its family's ``model_type``, e.g. "mixtral") plus eacmoe's sections
(``auto_map``, the ``eacmoe`` marker, ``quantization``, ``quantized_modules``, ``pesf``). Without
``trust_remote_code`` transformers takes the family's own classes, with no prompt: the tokenizer loads, and the
model class (``AutoModelForCausalLM`` or ``MixtralForCausalLM``) stops before building anything, on
``transformers_weights`` and on weight files under eacmoe's names (see ``eacmoe.export``), instead of silently
building the architecture with randomly initialised experts. With it, ``auto_map`` leads to these classes and
:meth:`EacmoeForCausalLM.from_pretrained`:

1. verifies every weight file against ``eacmoe_manifest.json`` (size and SHA-256);
2. builds the original architecture (config.json minus eacmoe's sections) with empty parameters;
3. puts a :class:`PackedLinear` / :class:`PackedExperts` at every path listed in ``quantized_modules``;
4. loads all tensors strictly (a missing or unexpected tensor is an error, never a random init);
5. optionally hooks PESF into every MoE block (the ``pesf`` section: ``enabled``, ``alpha``, ``renormalize``).

It returns the original transformers model class (e.g. ``MixtralForCausalLM``) holding packed modules, so
``generate``, lm-eval and everything else treat it as the ordinary model.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig

from .manifest import verify_manifest
from .packed_modules import PackedExperts, PackedLinear, replace_module

try:  # a flat copy inside an exported checkpoint
    from .pesf import PESFConfig, enable_pesf
except ImportError:  # the installed eacmoe package
    from eacmoe.pesf import PESFConfig, enable_pesf

logger = logging.getLogger(__name__)

__all__ = ["PESF_KWARGS", "EacmoeConfig", "EacmoeForCausalLM", "build_packed_model"]

PESF_KWARGS = ("pesf_alpha", "pesf_renormalize")  # the loader's PESF options (e.g. lm_eval --model_args)
REFUSAL_KEY = "transformers_weights"  # a refusal for transformers' own model classes (see eacmoe.export)
# config.json's own sections (eacmoe.export writes them); all the rest of it is the original model's config
PACKED_SECTIONS = ("architectures", "auto_map", "eacmoe", "quantization", "quantized_modules", "pesf", REFUSAL_KEY)


class EacmoeConfig(PretrainedConfig):
    """config.json of an export: the original model's config plus what eacmoe did to it.

    Attributes:
        base_config: the original transformers config as a dict (with its ``model_type`` and ``architectures``).
        eacmoe: the marker ``{"format": "packed", "version", "architectures"}`` (empty in exports made before it).
        quantization: method, bits schedule, grid settings, average bits, calibration and router-calibration
            settings (metadata; the tensors themselves say how they are packed).
        quantized_modules: ``{module path: spec}``; spec ``kind`` is "linear" (in/out features, bias) or
            "experts" (num_experts, hidden and intermediate size), both with bits / group_size / sym (an experts
            spec's bits is a list, one width per expert, for a per-module schedule).
        pesf: ``{"enabled", "alpha", "renormalize"}``: prefill expert skipping applied on load.

    Its other attributes are the original config's, ``model_type`` included (the class's own stays "eacmoe"), so
    code that reads the config (lm_eval's backend choice, AutoTokenizer) sees the family, as without remote code.
    """

    model_type = "eacmoe"

    def __init__(self, base_config: dict | None = None, quantization: dict | None = None,
                 quantized_modules: dict | None = None, pesf: dict | None = None, eacmoe: dict | None = None,
                 **kwargs):
        kwargs.pop(REFUSAL_KEY, None)  # meant for transformers' own model classes
        if base_config is None:  # the original config at the top level
            # with the loader's overrides that transformers merges in (dtype, attn_implementation, ...), as for the
            # original model; but not where it was loaded from (name_or_path: set on the model by the loader)
            base_config = {k: v for k, v in kwargs.items() if k not in PACKED_SECTIONS and k != "name_or_path"}
            if eacmoe and eacmoe.get("architectures"):
                base_config["architectures"] = eacmoe["architectures"]
        else:  # an export made before the eacmoe marker: model_type "eacmoe", the original config nested
            base_config = {k: v for k, v in base_config.items() if k != REFUSAL_KEY}
        self.base_config = base_config
        self.eacmoe = eacmoe or {}
        self.quantization = quantization or {}
        self.quantized_modules = quantized_modules or {}
        self.pesf = pesf or {"enabled": False, "alpha": 0.3, "renormalize": False}
        super().__init__(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """PretrainedConfig's, without its warning that config.json's model_type (the family's) is not the class's
        "eacmoe": in this layout it never is."""
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        return cls.from_dict(config_dict, **kwargs)


def _packed_module(spec: dict, original: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    if spec["kind"] == "linear":
        return PackedLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"], spec["sym"],
                            bias=spec.get("bias", False), dtype=dtype)
    if spec["kind"] == "experts":
        return PackedExperts(spec["num_experts"], spec["hidden_size"], spec["intermediate_size"], spec["bits"],
                             spec["group_size"], spec["sym"], act_fn=original.act_fn)
    raise ValueError(f"unknown packed module kind {spec['kind']!r}")


def _resolve_dtype(dtype, base_config) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        stored = getattr(base_config, "dtype", None) or torch.float32
        return getattr(torch, stored) if isinstance(stored, str) else stored
    return getattr(torch, str(dtype).removeprefix("torch."))


def build_packed_model(directory: str | Path, config: EacmoeConfig | None = None, dtype=None,
                       device: str | torch.device | None = None, pesf_alpha: float | None = None,
                       pesf_renormalize: bool | None = None) -> torch.nn.Module:
    """Load an exported checkpoint directory as the original model class with packed modules.

    ``pesf_alpha`` / ``pesf_renormalize`` override config.json's ``pesf`` section (alpha 0: PESF off).
    """
    directory = Path(directory)
    config = config or EacmoeConfig.from_pretrained(directory)
    pesf = _pesf_config(config.pesf, pesf_alpha, pesf_renormalize)  # bad settings fail before any weight is read
    weight_files = [f for f in verify_manifest(directory) if f.endswith(".safetensors")]
    base_config = AutoConfig.for_model(**config.base_config)
    dtype = _resolve_dtype(dtype, base_config)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (RoPE) computed for real
        model = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
    for name, spec in config.quantized_modules.items():
        replace_module(model, name, _packed_module(spec, model.get_submodule(name), dtype))

    # One shard at a time, straight onto the target device: host memory never holds the whole checkpoint.
    target = str(device) if device is not None else "cpu"
    expected = set(model.state_dict())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name in weight_files:
        shard = load_file(directory / name, device=target)
        shard = {k: t.to(dtype) if t.is_floating_point() and not k.endswith(".scales") else t for k, t in shard.items()}
        unexpected += model.load_state_dict(shard, strict=False, assign=True).unexpected_keys
        loaded.update(shard)
        del shard
    tied = _tied_keys(model)
    missing = sorted(expected - loaded - tied)
    if missing or unexpected:
        raise ValueError(f"{directory}: the weight files do not match the architecture (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); refusing to run with uninitialised weights")
    if tied:
        model.tie_weights()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"{directory}: no weights for {meta[:5]}; refusing to run with uninitialised weights")
    model.eval().requires_grad_(False)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.config.name_or_path = str(directory)
    model.eacmoe_config = config
    if pesf is not None:
        enable_pesf(model, pesf)
    return model.to(device) if device is not None else model  # moves what was built on the host (RoPE buffers)


def _pesf_config(section: dict, pesf_alpha, pesf_renormalize) -> PESFConfig | None:
    """The PESF to run (None: off): config.json's ``pesf`` section, overridden by the loader arguments."""
    enabled = _pesf_flag(section.get("enabled", False), "config.json pesf.enabled")
    alpha = _pesf_alpha(section.get("alpha", 0.3), "config.json pesf.alpha")
    renormalize = _pesf_flag(section.get("renormalize", False), "config.json pesf.renormalize")
    if pesf_alpha is not None:
        alpha = _pesf_alpha(pesf_alpha, "pesf_alpha")
        enabled = alpha > 0
    if pesf_renormalize is not None:
        renormalize = _pesf_flag(pesf_renormalize, "pesf_renormalize")
    return PESFConfig(alpha=alpha, renormalize=renormalize) if enabled else None


def _pesf_alpha(value, name: str) -> float:
    """A PESF threshold from a loader argument or config.json (lm_eval passes numbers, or strings it could not
    parse): a finite number >= 0, anything else is an error."""
    try:
        alpha = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        alpha = math.nan
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"{name} must be a number >= 0 (0: PESF off), got {value!r}")
    return alpha


def _pesf_flag(value, name: str) -> bool:
    """A PESF on/off setting: a bool, 0 / 1, or the strings true / false."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """Parameter names that transformers ties to another parameter (e.g. lm_head.weight to the embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied if isinstance(tied, (dict, list, set, tuple)) else [])


class EacmoeForCausalLM:
    """The ``auto_map`` entry point: ``from_pretrained`` returns the original model class with packed modules."""

    config_class = EacmoeConfig

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM") -> None:
        """Called by the Auto classes on remote-code models; only matters for pushing to the hub: nothing to do."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, dtype=None, torch_dtype=None,
                        device_map=None, pesf_alpha=None, pesf_renormalize=None, **kwargs):
        """Also takes ``pesf_alpha`` / ``pesf_renormalize`` (e.g. lm_eval ``--model_args ...,pesf_alpha=0.3``);
        any other ``pesf_*`` argument is an error (a typo must not silently run without PESF)."""
        unknown_pesf = sorted(k for k in kwargs if k.startswith("pesf_"))
        if unknown_pesf:
            raise ValueError(f"unknown PESF option {', '.join(unknown_pesf)}; "
                             f"the valid ones are {', '.join(PESF_KWARGS)}")
        directory = Path(pretrained_model_name_or_path)
        if not directory.is_dir():  # a hub repository: fetch it whole (weights, code, manifest)
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(str(pretrained_model_name_or_path), revision=kwargs.get("revision")))
        ignored = sorted(k for k, v in kwargs.items() if v is not None and k not in ("revision", "trust_remote_code"))
        if ignored:
            logger.debug("eacmoe loader ignores %s", ignored)
        device = None
        if isinstance(device_map, (str, torch.device)) and str(device_map) != "auto":
            device = device_map
        elif isinstance(device_map, dict) and len(set(device_map.values())) == 1:
            device = next(iter(device_map.values()))
        elif device_map == "auto":
            device = "cuda" if torch.cuda.is_available() else None
        cfg = config if isinstance(config, EacmoeConfig) else None
        return build_packed_model(directory, cfg, dtype=dtype if dtype is not None else torch_dtype, device=device,
                                  pesf_alpha=pesf_alpha, pesf_renormalize=pesf_renormalize)

