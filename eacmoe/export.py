"""Write a quantized model as a checkpoint: packed (default), GPTQ (GPTQModel / vLLM) or dequantized.

Computing the quantized state (`pipeline`) is kept apart from turning it into runtime modules (here, with the
classes of `eacmoe.runtime.packed_modules`), as in gpt-fast. The export works one decoder layer at a time: a
layer comes with its quantized weights, gets its Linears / fused experts swapped for packed modules, and its
state dict goes to the current safetensors shard. So a lazily loaded model is exported without ever being whole
in memory, and an in-memory one through the same code.

Formats:

- ``packed``: a self-contained Hugging Face directory. config.json is the original config (its ``model_type``,
  e.g. "mixtral", and every field at the top level, so any tool reading it sees the true shapes) plus eacmoe's
  sections: ``auto_map`` to the runtime classes, the marker ``eacmoe`` (``{"format": "packed", "version": 1}``
  and the original ``architectures``), the quantization metadata (method, bits schedule, calibration, router
  calibration), the list of packed modules and a ``pesf`` section; the runtime code is copied next to it; weights
  are safetensors with a size + SHA-256 manifest. ``AutoModelForCausalLM.from_pretrained(out,
  trust_remote_code=True)`` and ``lm_eval --model hf --model_args pretrained=out,trust_remote_code=True`` run the
  packed model. Without ``trust_remote_code`` transformers resolves the built-in family (no prompt: the tokenizer
  loads quietly) and its model class stops on ``transformers_weights`` (below) instead of building random experts.
  Exports made before the marker (``model_type: eacmoe``, the original config nested under ``base_config``) load
  with the same runtime.
- ``gptq``: GPTQModel's layout and format "gptq" (v1 zero points), per-expert names
  ``mlp.experts.{e}.{gate,up,down}_proj.{qweight,qzeros,scales,g_idx}``, fp16 for everything else,
  ``quantize_config.json`` + ``quantization_config``; per-module bit widths other than the default go to
  GPTQModel's ``dynamic`` overrides.
- ``dequantized``: the standard layout in the checkpoint's dtype, holding the dequantized values (rounded to
  that dtype), for any tool.

Neither packed nor gptq is a checkpoint that transformers' own loader can fill: it would build the architecture
and leave every tensor it does not find (the packed modules; with optimum, the fused experts of a GPTQ MoE)
randomly initialised. So both keep it out twice: the weight files avoid the names it looks for
(``model.safetensors`` and its index), and config.json names in ``transformers_weights`` a "file" that is a
sentence saying how to load the checkpoint: transformers 5 resolves the weight files before it builds the model,
and refuses that one with the sentence in its error. ``eacmoe.verify`` checks a model loaded by any other loader.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .adapters import get_adapter
from .quant.grid import QuantizedWeight
from .quant.packing import _zeros_to_v1
from .runtime.manifest import write_manifest
from .runtime.modeling_eacmoe import REFUSAL_KEY
from .runtime.packed_modules import EXPERT_PROJS, PackedExperts, PackedLinear, replace_module

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("packed", "gptq", "dequantized")
_PACKAGE = Path(__file__).resolve().parent
# file in the export <- source in the package (the runtime's own modules plus what they import)
RUNTIME_FILES = {
    "modeling_eacmoe.py": _PACKAGE / "runtime" / "modeling_eacmoe.py",
    "packed_modules.py": _PACKAGE / "runtime" / "packed_modules.py",
    "manifest.py": _PACKAGE / "runtime" / "manifest.py",
    "grid.py": _PACKAGE / "quant" / "grid.py",
    "packing.py": _PACKAGE / "quant" / "packing.py",
    "pesf.py": _PACKAGE / "pesf.py",
}
AUTO_MAP = {"AutoConfig": "modeling_eacmoe.EacmoeConfig", "AutoModelForCausalLM": "modeling_eacmoe.EacmoeForCausalLM"}
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
PACKED_WEIGHTS_BASENAME = "eacmoe-packed"  # the runtime reads what its manifest lists; transformers wants "model"
# transformers takes config.json's `transformers_weights` (REFUSAL_KEY) as the weights' file name and stops with it
# in the error message when it is not a *.safetensors name: the way to stop it that says why (module docstring)
PACKED_REFUSAL = ("eacmoe packed export: its quantized modules are packed low-bit tensors that this class would "
                  "leave randomly initialised; load it with AutoModelForCausalLM.from_pretrained(DIR, "
                  "trust_remote_code=True)")
# config.json's own record that a directory is a packed export (tools must not go by model_type: it is the family's)
PACKED_MARKER = {"format": "packed", "version": 1}
GPTQ_REFUSAL = ("eacmoe GPTQ export of a MoE model: the transformers GPTQ integration would leave its experts "
                "randomly initialised; load it with GPTQModel (GPTQModel.load(DIR))")
# GPTQModel refuses asymmetric format-"gptq" (v1) checkpoints unless meta.quantizer names gptqmodel >= 0.9: older
# AutoGPTQ wrote v1 zero points that cannot be read back exactly. Ours are encoded exactly as GPTQModel 7.6.0 encodes
# them (bit-identical, tests/test_packing.py), so the checkpoint says it is compatible with that producer.
GPTQMODEL_COMPATIBLE_PRODUCER = "gptqmodel:7.6.0"


@dataclass
class LayerToExport:
    """Decoder layer ``index`` on CPU (dequantized weights) and its quantized weights, names relative to it."""

    index: int
    module: nn.Module
    quantized: dict[str, QuantizedWeight]


# -- swapping in the runtime modules ----------------------------------------------------------------------
def pack_layer(layer: nn.Module, quantized: dict[str, QuantizedWeight], adapter) -> dict[str, dict]:
    """Replace, in place, every quantized Linear of ``layer`` by a PackedLinear and its fused experts (if they are
    quantized) by a PackedExperts. Returns ``{layer-relative module path: spec}`` for config.json."""
    specs: dict[str, dict] = {}
    block = adapter.moe_block(layer)
    experts_path = None
    if block is not None:
        experts = adapter.experts(block)
        experts_path = next(n for n, m in layer.named_modules() if m is experts)
        per_expert: dict[int, dict[str, QuantizedWeight]] = {}
        pattern = re.compile(rf"^{re.escape(experts_path)}\.(\d+)\.({'|'.join(EXPERT_PROJS)})$")
        for name, qw in quantized.items():
            match = pattern.match(name)
            if match:
                per_expert.setdefault(int(match.group(1)), {})[match.group(2)] = qw
        if per_expert:
            if len(per_expert) != adapter.num_experts(block) or any(len(p) != 3 for p in per_expert.values()):
                raise ValueError(f"layer {experts_path}: only some experts are quantized; cannot pack the layer")
            packed = PackedExperts.from_quantized(dict(sorted(per_expert.items())), act_fn=adapter.expert_act(block))
            replace_module(layer, experts_path, packed)
            specs[experts_path] = {"kind": "experts", "num_experts": packed.num_experts,
                                   "hidden_size": packed.hidden_size, "intermediate_size": packed.intermediate_size,
                                   "bits": packed.bits, "group_size": packed.group_size, "sym": packed.sym}
    for name, qw in quantized.items():
        if experts_path is not None and name.startswith(experts_path + "."):
            continue
        linear = layer.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear; cannot pack it")
        replace_module(layer, name, PackedLinear.from_quantized(qw, linear.bias))
        specs[name] = {"kind": "linear", "in_features": linear.in_features, "out_features": linear.out_features,
                       "bias": linear.bias is not None, "bits": qw.bits, "group_size": qw.group_size, "sym": qw.sym}
    return specs


def pack_model(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> nn.Module:
    """Swap packed modules into an in-memory quantized model (``quantized`` as the pipeline names it:
    ``layers.{i}.<path in the layer>``). Returns the model, now holding only packed expert/attention weights."""
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.decoder_layers(model)):
        pack_layer(layer, layer_quantized(quantized, i), adapter)
    return model


def layer_quantized(quantized: dict[str, QuantizedWeight], index: int) -> dict[str, QuantizedWeight]:
    """The quantized weights of decoder layer ``index``, named relative to the layer."""
    prefix = f"layers.{index}."
    return {name.removeprefix(prefix): qw for name, qw in quantized.items() if name.startswith(prefix)}


# -- writing ------------------------------------------------------------------------------------------------
class ShardWriter:
    """Collects tensors and writes safetensors shards of at most ``max_shard_bytes``: ``{basename}.safetensors``
    if it all fits, else ``{basename}-00001-of-0000n.safetensors`` ... indexed by ``{basename}.safetensors.index.json``
    (``save_pretrained``'s scheme, with the base name given to :meth:`close`)."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_shard_bytes:
                self._flush()
            self.pending[key] = tensor.detach().contiguous().cpu()
            self.pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f"part-{len(self.parts):05d}.safetensors.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self, basename: str) -> list[str]:
        """Write the last shard (and the index when there are several); returns the file names."""
        if self.pending or not self.parts:
            self._flush()
        n = len(self.parts)
        names = ([f"{basename}.safetensors"] if n == 1
                 else [f"{basename}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        weight_map = {}
        for (path, keys), name in zip(self.parts, names):
            path.rename(self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / f"{basename}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _storage_tensor(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating tensor in ``dtype`` if that is lossless (e.g. untouched bf16 weights held in fp32), else as is
    (e.g. calibrated fp32 routers); integer tensors unchanged."""
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    converted = tensor.to(dtype)
    return converted if torch.equal(converted.to(tensor.dtype), tensor) else tensor


def _gptq_tensor(key: str, tensor: torch.Tensor, module: nn.Module | None) -> torch.Tensor:
    """GPTQModel's storage: fp16 for every floating tensor, v1 ("zero - 1") zero points."""
    if key.endswith(".qzeros") and isinstance(module, PackedLinear):
        return _zeros_to_v1(tensor, module.bits, module.out_features)
    return tensor.to(torch.float16) if tensor.is_floating_point() else tensor


def export_model(out_dir: Path, fmt: str, model: nn.Module, layers: Iterator[LayerToExport],
                 non_layer_state: dict[str, torch.Tensor], tokenizer, metadata: dict,
                 storage_dtype: torch.dtype, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write ``out_dir`` (must exist, empty of weights) in format ``fmt`` ("packed" or "gptq"); returns the weight
    files. ``model`` provides the config; ``layers`` yields every decoder layer once; ``non_layer_state`` is
    everything outside the decoder layers (embeddings, final norm, head; tied copies dropped)."""
    if fmt not in ("packed", "gptq"):
        raise ValueError(f"export_model writes packed or gptq checkpoints, not {fmt!r}")
    adapter = get_adapter(model)
    layers_prefix = decoder_layers_path(model)
    writer = ShardWriter(out_dir, max_shard_bytes)
    module_specs: dict[str, dict] = {}
    for layer in layers:
        prefix = f"{layers_prefix}.{layer.index}."
        specs = pack_layer(layer.module, layer.quantized, adapter)
        module_specs.update({prefix + name: spec for name, spec in specs.items()})
        packed_owner = {n: m for n, m in layer.module.named_modules() if isinstance(m, PackedLinear)}
        tensors = {}
        for key, tensor in layer.module.state_dict().items():
            if fmt == "gptq":
                tensor = _gptq_tensor(key, tensor, packed_owner.get(key.rpartition(".")[0]))
            elif not key.endswith(".scales"):
                tensor = _storage_tensor(tensor, storage_dtype)
            tensors[prefix + key] = tensor
        writer.add(tensors)
    writer.add({k: (v.to(torch.float16) if fmt == "gptq" and v.is_floating_point() else _storage_tensor(v, storage_dtype))
                for k, v in non_layer_state.items()})

    base_config = model.config.to_dict()
    base_config["dtype"] = str(storage_dtype if fmt == "packed" else torch.float16).removeprefix("torch.")
    if fmt == "packed":
        weight_files = writer.close(PACKED_WEIGHTS_BASENAME)
        _write_packed_config(out_dir, base_config, [type(model).__name__], module_specs, metadata)
        for name, source in RUNTIME_FILES.items():
            shutil.copyfile(source, out_dir / name)
        write_manifest(out_dir, weight_files)
    else:
        quantize_config = gptq_quantize_config(module_specs, metadata)
        weight_files = writer.close(gptq_weights_basename(quantize_config))
        _write_gptq_config(out_dir, base_config, module_specs, quantize_config)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    log.info("wrote %s checkpoint: %d packed modules, %.1f MB of weights in %d file(s)", fmt, len(module_specs),
             writer.total_bytes / 1e6, len(weight_files))
    return weight_files


def _write_packed_config(out_dir: Path, base_config: dict, architectures: list[str], module_specs: dict,
                         metadata: dict) -> None:
    # The family's model_type keeps transformers from asking whether to run remote code (for the tokenizer, say);
    # architectures names our class, which tools that pick a model class by it (vLLM) do not know.
    config = {
        **base_config,
        "architectures": ["EacmoeForCausalLM"],
        "auto_map": AUTO_MAP,
        REFUSAL_KEY: PACKED_REFUSAL,
        "eacmoe": {**PACKED_MARKER, "architectures": architectures},
        "quantization": {**metadata, "packing": "gptq_v2 (plain zero points), fp16 scales",
                         "routers": "full precision" + (", re-calibrated (QESC)" if metadata.get("method", "").startswith("qesc") else "")},
        "quantized_modules": module_specs,
        "pesf": {"enabled": False, "alpha": 0.3, "renormalize": False},
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def is_packed_export(directory: str | Path) -> bool:
    """Whether ``directory`` holds a packed export: its config.json has the ``eacmoe`` marker, or is of the layout
    before the marker (``model_type: eacmoe``)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # not a config.json that eacmoe wrote; whoever loads it reports the problem
    if not isinstance(config, dict):
        return False
    marker = config.get("eacmoe")
    if isinstance(marker, dict):
        return marker.get("format") == PACKED_MARKER["format"]
    return config.get("model_type") == "eacmoe"  # the layout before the marker


def gptq_quantize_config(module_specs: dict, metadata: dict) -> dict:
    """GPTQModel's quantize_config: the most common bit width as ``bits``; every module with another width as a
    ``dynamic`` override (an anchored regex of its path, as GPTQModel matches module names): one for all experts
    of a layer when they share a width, else one per expert whose width differs (per-module schedules)."""
    widths = [b for spec in module_specs.values()
              for b in (spec["bits"] if isinstance(spec["bits"], list) else [spec["bits"]])]
    default_bits = max(set(widths), key=widths.count)
    projections = "(" + "|".join(EXPERT_PROJS) + ")$"
    dynamic = {}
    for name, spec in module_specs.items():
        if isinstance(spec["bits"], list):  # experts of one layer at different widths
            for e, bits in enumerate(spec["bits"]):
                if bits != default_bits:
                    dynamic["+:^" + re.escape(name) + rf"\.{e}\." + projections] = {"bits": bits}
        elif spec["bits"] != default_bits:
            pattern = re.escape(name) + (r"\.\d+\." + projections if spec["kind"] == "experts" else "$")
            dynamic["+:^" + pattern] = {"bits": spec["bits"]}
    first = next(iter(module_specs.values()))
    return {"bits": default_bits, "group_size": first["group_size"], "desc_act": bool(metadata.get("act_order")),
            "sym": first["sym"], "lm_head": False, "quant_method": "gptq", "checkpoint_format": "gptq",
            "format": "gptq", "dynamic": dynamic or None,
            "meta": {"quantizer": ["eacmoe", GPTQMODEL_COMPATIBLE_PRODUCER], "eacmoe": metadata}}


def gptq_weights_basename(quantize_config: dict) -> str:
    """The base name GPTQModel searches for before "model" (AutoGPTQ's ``gptq_model-{bits}bit-{group_size}g``);
    transformers does not look for it."""
    return f"gptq_model-{quantize_config['bits']}bit-{quantize_config['group_size']}g"


def _write_gptq_config(out_dir: Path, base_config: dict, module_specs: dict, quantize_config: dict) -> None:
    # What the loaders we know of accept (GPTQModel 7.6.0's TorchLinear; vLLM's GPTQ-Marlin MoE path, read not run)
    if quantize_config["group_size"] not in (-1, 16, 32, 64, 128, 256, 512, 1024):
        log.warning("group size %d: GPTQModel's kernels accept -1 or 16..1024 (powers of two) only",
                    quantize_config["group_size"])
    expert_bits = {b for spec in module_specs.values() if spec["kind"] == "experts"
                   for b in (spec["bits"] if isinstance(spec["bits"], list) else [spec["bits"]])}
    if expert_bits - {4, 8}:
        log.warning("experts at %s bits: GPTQModel loads this; vLLM's MoE kernels take 4- or 8-bit experts only",
                    sorted(expert_bits))
    config = {**base_config, "quantization_config": quantize_config, REFUSAL_KEY: GPTQ_REFUSAL}
    (out_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (out_dir / "quantize_config.json").write_text(json.dumps(quantize_config, indent=1) + "\n")


def non_layer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything of ``model``'s state outside its decoder layers, tied copies dropped (skeleton-safe: decoder
    layers may sit on the meta device)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    prefix = decoder_layers_path(model) + "."
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    return remove_tied_weights_from_state_dict(state, model)


def decoder_layers_path(model: nn.Module) -> str:
    """Dotted path of the decoder layer list in ``model`` (e.g. "model.layers")."""
    layers = get_adapter(model).decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def in_memory_layers(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> Iterator[LayerToExport]:
    """The layers of an in-memory quantized model (each is packed in place as it is exported)."""
    for i, layer in enumerate(get_adapter(model).decoder_layers(model)):
        yield LayerToExport(i, layer, layer_quantized(quantized, i))
