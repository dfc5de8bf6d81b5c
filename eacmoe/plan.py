"""`python -m eacmoe.plan`: GPU memory of an MoE model, FP16 or GPTQ-quantized, from its config alone.

No weights are read. The parameter inventory comes from the model family's adapter
(MoEAdapter.weight_inventory: which config fields mean experts, shared experts, dense layers, MLA sizes);
quantized Linears are sized exactly as a GPTQ checkpoint stores them (eacmoe.quant.packing): int32
qweight [ceil(K*b/32), N], int32 qzeros [ceil(K/G), ceil(N*b/32)], fp16 scales [ceil(K/G), N] and int32
g_idx [K]. Routers, gates, norms, embeddings and lm_head stay 16-bit, as in EAC-MoE and GPTQModel.

Units: GB = 1e9 bytes, the paper's unit (Mixtral-8x7B: 46.70 B parameters x 2 bytes = 93.41 GB, which is
86.99 GiB); GiB = 2**30 bytes. Both are printed.

Examples:
    python -m eacmoe.plan --model mixtral-8x7b --bits 16
    python -m eacmoe.plan --model mixtral-8x7b --bits 3 --attn-bits 4       # the paper's QESC 3.03-bit
    python -m eacmoe.plan --model deepseek-v2-lite --bits 2.5 --batch 4 --context 512 --gpu-memory 24GiB
    python -m eacmoe.plan --model /path/to/checkpoint --bits 2 --json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .adapters import MoEAdapter, UnsupportedModelError, get_adapter, supported_model_types
from .adapters.base import COMPONENTS, WeightSpec
from .assets import ASSETS_DIR, BUNDLED_MODELS, bundled_model_path
from .cli import OneLineErrorParser, one_line, print_error
from .schedule import ALLOWED_BITS, BitsError, check_group_size, format_schedule, parse_bits_schedule

logger = logging.getLogger(__name__)

CONFIGS_DIR = ASSETS_DIR / "configs"
DEFAULT_CONFIG = "mixtral-8x7b"
FP_BITS = 16          # storage width of everything that is not quantized (fp16 / bf16)
FP_BYTES = FP_BITS // 8
WORD_BYTES = 4        # GPTQ packs codes and zero points into int32 words
GB, GIB = 10**9, 2**30
# The paper labels its schedules by their average expert/attention bits on Mixtral; accept those labels.
PAPER_BITS_LABELS = {"2.06": "2", "2.54": "2.5", "3.03": "3"}
# EAC-MoE's reported weight memory (GB = 1e9 bytes) for the configurations this planner can reproduce:
# (bundled config, expert bits spec, attention bits, group size or None when nothing is quantized) -> GB.
PAPER_REFERENCE: dict[tuple[str, str, int | None, int | None], float] = {
    ("mixtral-8x7b", "16", None, None): 93.41,
    ("mixtral-8x7b", "3", 4, 128): 18.98,
}


class PlanError(ValueError):
    """Bad planner input (unknown config, bad bits, bad memory size); reported as a one-line error."""


# ---------------------------------------------------------------------------------------------------- configs
def bundled_config_names() -> tuple[str, ...]:
    """Names of the bundled real-model configs (``eacmoe/assets/configs/<name>.json``)."""
    return tuple(sorted(p.stem for p in CONFIGS_DIR.glob("*.json")))


def _config_from_dict(fields: dict[str, Any], origin: str) -> Any:
    """A transformers config of the dict's ``model_type`` (so missing fields take the class defaults)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    fields = {k: v for k, v in fields.items() if not k.startswith("_")}  # our metadata keys
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise PlanError(f"{origin} has no model_type")
    if model_type not in CONFIG_MAPPING:  # transformers' own message lists every model type it knows (~10 KB)
        raise PlanError(f"{origin}: unknown model_type {str(model_type)[:80]!r}; the supported MoE families are "
                        f"{', '.join(supported_model_types())}")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"cannot build a {model_type!r} config from {origin}: {one_line(exc, 200)}") from exc


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"cannot read config {path}: {one_line(exc, 200)}") from exc


def check_config(config: Any) -> None:
    """Refuse a config that describes no model (a size or count below 1, top-k above the experts), instead of
    planning negative gigabytes for it."""
    adapter = get_adapter(config)
    layers = config.num_hidden_layers
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise PlanError(f"the config's num_hidden_layers is {layers!r}; it must be a positive integer")
    experts = adapter.config_num_experts(config)
    if experts < 1:
        raise PlanError(f"the config gives {experts} routed experts per MoE layer; it needs at least 1")
    top_k = getattr(config, "num_experts_per_tok", None)
    if top_k is not None and not 1 <= top_k <= experts:
        raise PlanError(f"the config routes each token to {top_k} of {experts} experts (num_experts_per_tok); "
                        f"it must be between 1 and {experts}")
    for spec in adapter.weight_inventory(config):
        if spec.copies > 0 and any(d < 1 for d in spec.shape):
            raise PlanError(f"the config gives {spec.name} the shape {list(spec.shape)}; every size must be positive "
                            "(check hidden_size, intermediate sizes, heads and vocab_size)")
    if adapter.kv_cache_values_per_token(config, 0) < 1:
        raise PlanError("the config gives no positive KV-cache size per token (check the attention heads and head_dim)")


def load_config(name_or_path: str) -> tuple[Any, str]:
    """Resolve ``name_or_path`` to ``(transformers config, description of its source)``.

    Order: a bundled config name; a bundled model of ``eacmoe.quantize`` (tiny-mixtral, ...); a local
    ``config.json``-holding directory or a ``.json`` file; a hub id read with ``AutoConfig.from_pretrained``
    (needs network access or the local HF cache).
    """
    bundled = CONFIGS_DIR / f"{name_or_path}.json"
    if name_or_path in bundled_config_names():
        fields = json.loads(bundled.read_text())
        source = f"bundled config of {fields.get('_source_hub_id', '?')}"
        return _config_from_dict(fields, str(bundled)), source
    if name_or_path in BUNDLED_MODELS:
        path = bundled_model_path(name_or_path) / "config.json"
        return _config_from_dict(_read_json(path), str(path)), f"bundled model {name_or_path}"
    path = Path(name_or_path).expanduser()
    if path.is_file():
        fields = _read_json(path)
        if not isinstance(fields, dict):
            raise PlanError(f"{path} does not hold a JSON object")
        return _config_from_dict(fields, str(path)), f"file {path}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"directory {path} has no config.json")
        return _config_from_dict(_read_json(path / "config.json"), str(path)), f"directory {path}"
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise PlanError(f"--model {name_or_path}: no such file or directory")
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) is not None
    if not looks_like_hub_id:
        raise PlanError(
            f"unknown config {name_or_path!r}: not a bundled config ({', '.join(bundled_config_names())}), "
            f"a bundled model ({', '.join(BUNDLED_MODELS)}), an existing path, or a hub id (owner/name)"
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as exc:  # noqa: BLE001 - offline, missing repo, remote code: all one message
        reason = one_line(exc, 200) or type(exc).__name__
        raise PlanError(f"cannot load config {name_or_path!r} from the hub ({reason})") from exc
    return config, f"hub config of {name_or_path}"


# ---------------------------------------------------------------------------------------------------- inputs
def parse_memory(text: str) -> int:
    """Bytes from ``"24"`` (GB), ``"24GB"``, ``"24GiB"``, ``"512MiB"``, ``"1.5TB"`` (case-insensitive)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise PlanError(f"memory size must look like 24, 24GB or 24GiB (got {text!r})")
    value, unit = float(match.group(1)), (match.group(2) or "GB").lower()
    scale = {"kb": 10**3, "mb": 10**6, "gb": GB, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": GIB, "tib": 2**40}
    return int(round(value * scale[unit]))


@dataclass(frozen=True)
class BitsPlan:
    """What gets quantized: per-layer expert bits (None = 16-bit), attention bits, GPTQ group size."""

    expert_bits: tuple[int | None, ...]
    attn_bits: int | None
    group_size: int
    spec: str  # the --bits spec as normalized (paper labels mapped), for reports and the paper lookup
    # a per-module schedule (eacmoe/schedule.py): per layer, one width per routed expert (None: the layer's width)
    routed_expert_bits: tuple[tuple[int, ...] | None, ...] | None = None

    def bits_for(self, spec: WeightSpec) -> int | None:
        """Storage bits of a weight: None = 16-bit (never-quantized kinds, or a 16-bit schedule)."""
        if not spec.linear:
            return None
        if spec.component == "attention":
            return self.attn_bits
        return self.expert_bits[spec.layer]  # routed/shared experts and dense MLPs follow the layer's width

    def widths_for(self, spec: WeightSpec) -> list[tuple[int | None, int]]:
        """(storage bits, copies) of the tensors of one inventory entry: the routed experts of a layer with
        per-expert widths split by width, everything else one width for all its copies."""
        table = (self.routed_expert_bits[spec.layer]
                 if self.routed_expert_bits is not None and spec.layer is not None else None)
        if not spec.linear or spec.component != "routed_experts" or table is None:
            return [(self.bits_for(spec), spec.copies)]
        if len(table) != spec.copies:
            raise PlanError(f"--bits: layer {spec.layer} has {spec.copies} routed experts but its entry gives "
                            f"{len(table)} widths")
        return [(b, table.count(b)) for b in sorted(set(table))]

    @property
    def quantizes(self) -> bool:
        """Whether anything is quantized at all (else the group size is irrelevant)."""
        return any(b is not None for b in self.expert_bits) or self.attn_bits is not None

    def describe(self) -> str:
        experts = _describe_layer_bits(self.expert_bits)
        if self.routed_expert_bits is not None:
            experts = f"per module {format_schedule(list(self.expert_bits), _lists(self.routed_expert_bits))}"
        attention = "16-bit" if self.attn_bits is None else f"{self.attn_bits}-bit"
        group = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        return f"experts/dense MLPs {experts}; attention {attention}" + (f"; GPTQ {group}" if self.quantizes else "")


def _lists(table) -> list[list[int] | None]:
    return [None if t is None else list(t) for t in table]


def _describe_layer_bits(bits: Sequence[int | None]) -> str:
    """'3-bit' or '3-bit in layers 0-15, 2-bit in layers 16-31'."""
    runs: list[tuple[int | None, int, int]] = []
    for i, b in enumerate(bits):
        if runs and runs[-1][0] == b:
            runs[-1] = (b, runs[-1][1], i)
        else:
            runs.append((b, i, i))

    def width(b: int | None) -> str:
        return "16-bit" if b is None else f"{b}-bit"

    if len(runs) == 1:
        return width(runs[0][0])
    return ", ".join(f"{width(b)} in layer{'s' if lo != hi else ''} {lo}{f'-{hi}' if lo != hi else ''}"
                     for b, lo, hi in runs)


def parse_bits_plan(bits: str, attn_bits: str | int | None, group_size: int, num_layers: int) -> BitsPlan:
    """Validate ``--bits`` / ``--attn-bits`` / ``--group-size``.

    ``bits``: 16 (no quantization), 2, 3, 4, 8, 2.5 (first half of the layers 3-bit, second half 2-bit), a
    comma list with one width per decoder layer (or, per-module, per routed expert: eacmoe/schedule.py), or the
    paper's labels 2.06 / 2.54 / 3.03 (= 2 / 2.5 / 3).
    ``attn_bits`` None: 4 when anything else is quantized, else 16 (so ``--bits 16`` is the FP16 model).
    """
    spec = PAPER_BITS_LABELS.get(str(bits).strip(), str(bits).strip())
    if spec.startswith("auto:"):
        raise PlanError(f"--bits {spec}: the planner sizes a fixed schedule; give the one python -m eacmoe.quantize "
                        "--bits auto:B wrote (--bits \"$(cat OUT/bits_schedule.txt)\", or report.json "
                        "bit_allocation.schedule), e.g. --bits 3,2,2,2,2,3,3,3")
    routed = None
    if spec in ("16", "fp16", "bf16"):
        expert_bits: list[int | None] = [None] * num_layers
        spec = "16"
    else:
        try:
            layer_bits, routed = parse_bits_schedule(spec, num_layers)
        except BitsError as exc:
            raise PlanError(f"{exc}; 16 keeps the experts in 16-bit") from exc
        expert_bits = list(layer_bits)
    if attn_bits is None:
        attn = None if spec == "16" else 4
    else:
        try:
            attn_value = int(str(attn_bits).strip())
        except ValueError:
            attn_value = -1
        if attn_value not in (*ALLOWED_BITS, FP_BITS):
            raise PlanError(f"--attn-bits must be one of {', '.join(map(str, ALLOWED_BITS))} or 16 (got {attn_bits!r})")
        attn = None if attn_value == FP_BITS else attn_value
    try:
        check_group_size(group_size, ())  # against the model's widths in plan_memory
    except BitsError as exc:
        raise PlanError(str(exc)) from exc
    return BitsPlan(tuple(expert_bits), attn, group_size, spec,
                    None if routed is None else tuple(None if r is None else tuple(r) for r in routed))


# ---------------------------------------------------------------------------------------------------- sizing
@dataclass
class StorageBytes:
    """Bytes of some tensors, split by what they hold."""

    params: int = 0             # parameters (elements) these bytes store, buffers included
    quantized_params: int = 0   # of which stored as b-bit codes
    code_bits: int = 0          # sum of b over the quantized parameters (for the paper's average bits)
    codes: int = 0              # packed int32 qweight
    scales: int = 0             # fp16 scales, one per (group, output)
    zeros: int = 0              # packed int32 qzeros, one b-bit zero point per (group, output)
    g_idx: int = 0              # int32 group index per input column
    fp16: int = 0               # tensors kept in 16-bit

    @property
    def total(self) -> int:
        return self.codes + self.scales + self.zeros + self.g_idx + self.fp16

    def add(self, other: StorageBytes) -> None:
        for name in ("params", "quantized_params", "code_bits", "codes", "scales", "zeros", "g_idx", "fp16"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def gptq_linear_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> StorageBytes:
    """Bytes of one GPTQ-packed Linear [out, in]: qweight, qzeros, scales, g_idx (bias not included).

    Groups: ``ceil(in / group_size)`` (GPTQModel pads a last partial group); words: ``ceil(values * b / 32)``.
    """
    n_groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    qweight_rows = math.ceil(in_features * bits / 32)
    qzeros_cols = math.ceil(out_features * bits / 32)
    return StorageBytes(
        params=out_features * in_features,
        quantized_params=out_features * in_features,
        code_bits=out_features * in_features * bits,
        codes=qweight_rows * out_features * WORD_BYTES,
        scales=n_groups * out_features * FP_BYTES,
        zeros=n_groups * qzeros_cols * WORD_BYTES,
        g_idx=in_features * WORD_BYTES,
    )


def weight_spec_bytes(spec: WeightSpec, bits: int | None, group_size: int) -> StorageBytes:
    """Bytes of all ``spec.copies`` tensors of one inventory entry at ``bits`` (None = 16-bit)."""
    if bits is None:
        return StorageBytes(params=spec.numel, fp16=spec.numel * FP_BYTES)
    one = gptq_linear_bytes(spec.shape[0], spec.shape[1], bits, group_size)
    return StorageBytes(**{name: value * spec.copies for name, value in asdict(one).items()})


@dataclass
class TensorRow:
    """One kind of tensor summed over layers and experts, for the accounting table."""

    component: str
    name: str
    shape: tuple[int, ...]
    bits: int | None
    tensors: int
    storage: StorageBytes


@dataclass
class KVCachePlan:
    """fp16 KV cache of ``batch`` sequences of ``context`` tokens."""

    batch: int
    context: int
    bytes: int
    values_per_token: int       # cached values per token, summed over layers
    layout: str                 # human description (GQA heads or MLA latent)
    sliding_layers: int = 0
    window: int | None = None


def kv_cache_plan(config: Any, adapter: MoEAdapter, batch: int, context: int) -> KVCachePlan:
    """Closed form: sum over layers of ``batch * cached_tokens(layer) * values_per_token(layer) * 2`` bytes.

    ``values_per_token`` is the family's: ``2 * kv_heads * head_dim`` (GQA/MHA) or ``kv_lora_rank +
    qk_rope_head_dim`` (DeepSeek MLA: transformers caches the compressed latent). Layers with a sliding window
    (``sliding_window`` set and, when the config has ``layer_types``, marked ``sliding_attention``) cache at most
    ``sliding_window`` tokens.
    """
    if batch < 1 or context < 1:
        raise PlanError(f"--batch and --context must be >= 1 (got {batch}, {context})")
    window = getattr(config, "sliding_window", None) or None
    layer_types = getattr(config, "layer_types", None)
    total_values = total_bytes = sliding = 0
    for layer in range(config.num_hidden_layers):
        values = adapter.kv_cache_values_per_token(config, layer)
        is_sliding = window is not None and (layer_types is None or layer_types[layer] == "sliding_attention")
        tokens = min(context, int(window)) if is_sliding else context
        sliding += int(is_sliding)
        total_values += values
        total_bytes += batch * tokens * values * FP_BYTES
    layout = adapter.kv_cache_layout(config)
    return KVCachePlan(batch, context, total_bytes, total_values, layout, sliding, int(window) if window else None)


@dataclass
class MemoryPlan:
    """Everything the planner computed for one model and schedule."""

    model: str
    source: str
    family: str
    config_summary: dict[str, Any]
    bits: BitsPlan
    parameters: int
    components: dict[str, StorageBytes]
    tensors: list[TensorRow]
    kv_cache: KVCachePlan
    gpu_bytes: int
    reserve_bytes: int
    paper_gb: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def weights(self) -> StorageBytes:
        total = StorageBytes()
        for storage in self.components.values():
            total.add(storage)
        return total

    @property
    def required_bytes(self) -> int:
        return self.weights.total + self.kv_cache.bytes + self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.required_bytes <= self.gpu_bytes

    @property
    def paper_average_bits(self) -> float | None:
        """Code bits per quantized weight, the paper's "3.03-bit" (None when nothing is quantized)."""
        w = self.weights
        return w.code_bits / w.quantized_params if w.quantized_params else None

    @property
    def bits_per_parameter(self) -> float:
        """All weight bytes (codes, scales, zeros, g_idx, 16-bit tensors) per parameter, in bits."""
        w = self.weights
        return 8 * w.total / max(1, w.params)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plan (all byte counts exact integers, GB/GiB as floats)."""
        w = self.weights

        def storage(s: StorageBytes) -> dict[str, Any]:
            return {**asdict(s), "total": s.total, "total_gb": s.total / GB, "total_gib": s.total / GIB}
        return {
            "model": self.model,
            "source": self.source,
            "family": self.family,
            "config": self.config_summary,
            "parameters": self.parameters,
            "schedule": {
                "bits": self.bits.spec,
                "expert_bits_per_layer": [16 if b is None else b for b in self.bits.expert_bits],
                "routed_expert_bits": (None if self.bits.routed_expert_bits is None
                                       else _lists(self.bits.routed_expert_bits)),
                "attn_bits": 16 if self.bits.attn_bits is None else self.bits.attn_bits,
                "group_size": self.bits.group_size,
                "description": self.bits.describe(),
                "paper_average_bits": self.paper_average_bits,
                "bits_per_parameter": self.bits_per_parameter,
            },
            "components": {name: storage(s) for name, s in self.components.items()},
            "tensors": [
                {"component": r.component, "name": r.name, "shape": list(r.shape),
                 "bits": 16 if r.bits is None else r.bits, "tensors": r.tensors, **storage(r.storage)}
                for r in self.tensors
            ],
            "weights": storage(w),
            "kv_cache": {**asdict(self.kv_cache), "gb": self.kv_cache.bytes / GB, "gib": self.kv_cache.bytes / GIB},
            "reserve_bytes": self.reserve_bytes,
            "required_bytes": self.required_bytes,
            "required_gb": self.required_bytes / GB,
            "required_gib": self.required_bytes / GIB,
            "gpu_bytes": self.gpu_bytes,
            "gpu_gb": self.gpu_bytes / GB,
            "gpu_gib": self.gpu_bytes / GIB,
            "fits": self.fits,
            "paper_gb": self.paper_gb,
            "notes": self.notes,
        }


def _config_summary(config: Any, adapter: MoEAdapter, inventory: list[WeightSpec]) -> dict[str, Any]:
    moe_layers = [i for i in range(config.num_hidden_layers) if adapter.config_is_moe_layer(config, i)]
    return {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "moe_layers": len(moe_layers),
        "dense_layers": config.num_hidden_layers - len(moe_layers),
        "num_experts": adapter.config_num_experts(config),
        "top_k": getattr(config, "num_experts_per_tok", None),
        "expert_intermediate_size": adapter.config_expert_intermediate_size(config),
        "shared_experts": any(s.component == "shared_experts" for s in inventory),
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
    }


def plan_memory(
    config: Any, bits: BitsPlan, *, batch: int = 1, context: int = 2048, gpu_bytes: int = 24 * GB,
    reserve_bytes: int = 0, model: str = "", source: str = "",
) -> MemoryPlan:
    """Size the weights (per component and per tensor kind), the KV cache, and check the GPU budget."""
    check_config(config)
    adapter = get_adapter(config)
    if len(bits.expert_bits) != config.num_hidden_layers:
        raise PlanError(f"{len(bits.expert_bits)} expert bit widths for {config.num_hidden_layers} layers")
    inventory = adapter.weight_inventory(config)
    try:  # the same rule as eacmoe.quantize: a group size that divides every quantized input width
        check_group_size(bits.group_size, (s.shape[1] for s in inventory if bits.bits_for(s) is not None))
    except BitsError as exc:
        raise PlanError(str(exc)) from exc
    components = {name: StorageBytes() for name in COMPONENTS}
    rows: dict[tuple[str, str, tuple[int, ...], int | None], TensorRow] = {}
    if bits.routed_expert_bits is not None:
        moe = [adapter.config_is_moe_layer(config, i) for i in range(config.num_hidden_layers)]
        dense = [i for i, t in enumerate(bits.routed_expert_bits) if t is not None and not moe[i]]
        if dense:
            raise PlanError(f"--bits: layer {dense[0]} is dense (no routed experts) but its entry gives per-expert widths")
    for spec in inventory:
        for width, copies in bits.widths_for(spec):
            part = replace(spec, copies=copies)
            storage = weight_spec_bytes(part, width, bits.group_size)
            components[spec.component].add(storage)
            key = (spec.component, spec.name, spec.shape, width)
            row = rows.setdefault(key, TensorRow(spec.component, spec.name, spec.shape, width, 0, StorageBytes()))
            row.tensors += copies
            row.storage.add(storage)
    components = {name: s for name, s in components.items() if s.params}
    notes = _notes(config, bits, inventory)
    plan = MemoryPlan(
        model=model, source=source, family=adapter.family, config_summary=_config_summary(config, adapter, inventory),
        bits=bits, parameters=adapter.count_parameters(config), components=components,
        tensors=sorted(rows.values(), key=lambda r: COMPONENTS.index(r.component)),  # stable: inventory order
        kv_cache=kv_cache_plan(config, adapter, batch, context), gpu_bytes=gpu_bytes, reserve_bytes=reserve_bytes,
        paper_gb=PAPER_REFERENCE.get((model, bits.spec, bits.attn_bits, bits.group_size if bits.quantizes else None)),
        notes=notes,
    )
    logger.debug("planned %s: %d parameters, %d weight bytes", model, plan.parameters, plan.weights.total)
    return plan


def _notes(config: Any, bits: BitsPlan, inventory: list[WeightSpec]) -> list[str]:
    """Caveats that apply to this particular plan."""
    notes = []
    odd = sorted({d for s in inventory if bits.bits_for(s) == 3 for d in s.shape if d % 32})
    if odd:
        notes.append(f"3-bit GPTQ packing needs dimensions divisible by 32; {odd} are not "
                     "(sized as ceil(d*3/32) words, but GPTQModel's 3-bit kernels would reject them)")
    if getattr(config, "tie_word_embeddings", False):
        notes.append("tied embeddings: the lm_head shares the embedding matrix and is counted once")
    return notes


# ---------------------------------------------------------------------------------------------------- report
def _gb(n: int) -> str:
    return f"{n / GB:.3f}"


def format_plan(plan: MemoryPlan) -> str:
    """Human-readable report: summary, per-component table, per-tensor accounting, KV cache, verdict, notes."""
    c = plan.config_summary
    w = plan.weights
    lines = [
        f"Memory plan: {plan.model} ({plan.source})",
        f"  family {plan.family}: {c['num_hidden_layers']} layers ({c['moe_layers']} MoE, {c['dense_layers']} dense), "
        f"{c['num_experts']} experts top-{c['top_k']} x {c['expert_intermediate_size']} wide"
        f"{' + shared experts' if c['shared_experts'] else ''}, hidden {c['hidden_size']}, vocab {c['vocab_size']}",
        f"  {plan.parameters:,} parameters ({plan.parameters / 1e9:.3f} B)",
        f"  schedule: {plan.bits.describe()}; routers, gates, norms, embeddings, lm_head, biases 16-bit",
    ]
    if plan.paper_average_bits is not None:
        lines.append(
            f"  average bits: {plan.paper_average_bits:.2f} per quantized weight (codes only, the paper's label); "
            f"{plan.bits_per_parameter:.2f} per parameter with scales, zeros, g_idx and 16-bit tensors"
        )
    header = (f"  {'component':<16}{'params':>16}{'codes':>9}{'scales':>9}{'zeros':>9}{'g_idx':>9}{'16-bit':>9}"
              f"{'GB':>10}{'GiB':>10}")
    lines += ["", "Weights (GB = 1e9 bytes; codes = packed int32 qweight)", header, "  " + "-" * (len(header) - 2)]
    for name, s in [*plan.components.items(), ("total", w)]:
        if name == "total":
            lines.append("  " + "-" * (len(header) - 2))
        lines.append(
            f"  {name:<16}{s.params:>16,}{_gb(s.codes):>9}{_gb(s.scales):>9}{_gb(s.zeros):>9}{_gb(s.g_idx):>9}"
            f"{_gb(s.fp16):>9}{s.total / GB:>10.3f}{s.total / GIB:>10.3f}"
        )
    lines += ["", "Tensors (summed over layers and experts; GPTQ overhead = scales + zeros + g_idx)"]
    lines.append(f"  {'component':<15}{'tensor':<40}{'shape':>14}{'bits':>5}{'count':>7}{'GB':>9}{'overhead GB':>13}")
    for r in plan.tensors:
        shape = "x".join(map(str, r.shape))
        overhead = r.storage.scales + r.storage.zeros + r.storage.g_idx
        lines.append(
            f"  {r.component:<15}{r.name:<40}{shape:>14}{16 if r.bits is None else r.bits:>5}{r.tensors:>7}"
            f"{r.storage.total / GB:>9.3f}{overhead / GB:>13.4f}"
        )
    kv = plan.kv_cache
    window = f"; {kv.sliding_layers} layers capped at a {kv.window}-token window" if kv.sliding_layers else ""
    lines += [
        "",
        f"KV cache (fp16): batch {kv.batch} x {kv.context} tokens, {kv.layout}{window}: "
        f"{kv.bytes / GB:.3f} GB ({kv.bytes / GIB:.3f} GiB)",
        f"Required: weights {w.total / GB:.3f} + KV {kv.bytes / GB:.3f} + reserve {plan.reserve_bytes / GB:.3f} = "
        f"{plan.required_bytes / GB:.3f} GB ({plan.required_bytes / GIB:.3f} GiB)",
        f"GPU: {plan.gpu_bytes / GB:.3f} GB ({plan.gpu_bytes / GIB:.3f} GiB): "
        + ("FITS" if plan.fits else "DOES NOT FIT")
        + f", {abs(plan.gpu_bytes - plan.required_bytes) / GB:.3f} GB {'free' if plan.fits else 'short'}",
    ]
    if plan.paper_gb is not None:
        lines += ["", _paper_comparison(plan)]
    lines += [
        "",
        "Not counted: activations, CUDA context and allocator slack, framework workspaces (use --reserve).",
        "GPTQ layout per quantized Linear [N out, K in], b bits, G group: qweight int32 ceil(K*b/32) x N, "
        "qzeros int32 ceil(K/G) x ceil(N*b/32), scales fp16 ceil(K/G) x N, g_idx int32 K.",
        *[f"Note: {n}" for n in plan.notes],
    ]
    return "\n".join(lines)


def _paper_comparison(plan: MemoryPlan) -> str:
    """The paper's figure next to ours, with what the difference is made of."""
    w = plan.weights
    ours = w.total / GB
    diff = 100 * (ours - plan.paper_gb) / plan.paper_gb
    text = f"EAC-MoE reports {plan.paper_gb:.2f} GB for this configuration; this plan: {ours:.3f} GB ({diff:+.2f}%)."
    if w.quantized_params:
        without_gidx = (w.total - w.g_idx) / GB
        text += (
            f" Of the plan, {w.g_idx / GB:.3f} GB is g_idx (int32 per input column, stored by GPTQ checkpoints even"
            f" without act-order; {without_gidx:.3f} GB without it) and {(w.scales + w.zeros) / GB:.3f} GB scales +"
            " zero points; the paper does not itemise its figure, so the residual is its rounding/accounting."
        )
    else:
        text += (f" {plan.parameters / 1e9:.3f} B parameters x 2 bytes: the paper's GB is 1e9 bytes"
                 f" (the same bytes are {ours * GB / GIB:.2f} GiB).")
    return text


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m eacmoe.plan", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_CONFIG,
                   help=f"bundled config ({', '.join(bundled_config_names())}), bundled model "
                        f"({', '.join(BUNDLED_MODELS)}), a local checkpoint directory or config.json, or a hub id read "
                        f"with AutoConfig (online). Default: {DEFAULT_CONFIG}")
    p.add_argument("--bits", default="3",
                   help="expert (and dense-MLP) bits: 16 (unquantized), 2, 3, 4, 8; 2.5 = first half of the layers "
                        "3-bit, second half 2-bit; a comma list with one width per decoder layer, where a MoE layer's "
                        "entry may give one width per routed expert (2/3/2/..., optionally 4:2/3/2/... with the shared "
                        "experts' width first), as python -m eacmoe.quantize --bits auto:B prints; "
                        "the paper's labels 2.06 / 2.54 / 3.03 mean 2 / 2.5 / 3. Default: 3")
    p.add_argument("--attn-bits", default=None,
                   help="attention bits: 2, 3, 4, 8 or 16 (unquantized). Default: 4, or 16 with --bits 16")
    p.add_argument("--group-size", type=int, default=128,
                   help="GPTQ group size (input columns per scale/zero point); -1 = one group per output row. "
                        "Default: 128")
    p.add_argument("--batch", type=int, default=1, help="sequences held in the KV cache. Default: 1")
    p.add_argument("--context", type=int, default=2048,
                   help="tokens per sequence (prompt + generated) held in the KV cache. Default: 2048")
    p.add_argument("--gpu-memory", default="24GB",
                   help="GPU memory to fit into: a number in GB (1e9 bytes) or with a unit, e.g. 24GB, 24GiB, "
                        "80GB. Default: 24GB (an RTX 3090/4090 has 24 GiB = 25.77 GB)")
    p.add_argument("--reserve", default="0GB",
                   help="extra memory to set aside for activations, CUDA context and allocator slack, same units "
                        "as --gpu-memory. Default: 0GB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    p.add_argument("--list-configs", action="store_true", help="list the bundled configs and their sources, and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _list_configs() -> str:
    lines = []
    for name in bundled_config_names():
        fields = json.loads((CONFIGS_DIR / f"{name}.json").read_text())
        lines.append(f"{name:<20} {fields.get('model_type', '?'):<12} {fields.get('_source_hub_id', '?')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.list_configs:
        print(_list_configs())
        return 0
    try:
        config, source = load_config(args.model)
        plan = plan_memory(
            config,
            parse_bits_plan(args.bits, args.attn_bits, args.group_size, config.num_hidden_layers),
            batch=args.batch, context=args.context, gpu_bytes=parse_memory(args.gpu_memory),
            reserve_bytes=parse_memory(args.reserve), model=args.model, source=source,
        )
    except (PlanError, UnsupportedModelError) as exc:
        print_error(exc)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
