"""Lazy, layer-at-a-time access to a safetensors checkpoint: peak memory scales with one decoder layer.

A real Mixtral-8x7B is 93 GB; neither the compute device nor the CPU may hold it whole. `LayerLoader` builds
the model *skeleton* with every parameter on the ``meta`` device (no memory), materialises only what lives
outside the decoder layers (embeddings, final norm, lm_head, rotary buffers), and materialises decoder layer
``i`` on request, reading only that layer's tensors from the shard(s).

Checkpoints on disk (``save_pretrained`` output and hub checkpoints alike) use the *legacy* per-expert key
layout (e.g. Mixtral ``block_sparse_moe.experts.E.w1.weight``), while transformers 5 fuses the experts into 3D
parameters. Instead of re-implementing that mapping per family we reuse transformers' own conversion machinery
(``conversion_mapping.get_model_conversion_mapping`` + ``core_model_loading``): the same renamings/converters
``from_pretrained`` applies, restricted to one layer's keys, and the same reverse transform ``save_pretrained``
applies when we write a layer back. The result is bit-identical to the layer of a normally loaded model.

Also here: the `LayerSource`s the pipeline and the evaluation read layers from in lazy mode, the layer-by-layer
writer of the output model (same keys and files ``save_pretrained`` would produce, loadable with
``from_pretrained``), and a streaming merge of safetensors files.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    convert_and_load_state_dict_in_model,
    rename_source_key,
    revert_weight_conversion,
)
from transformers.modeling_utils import LoadStateDictConfig, remove_tied_weights_from_state_dict
from transformers.utils import logging as hf_logging

from .adapters import get_adapter
from .weight_scan import check_finite

log = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Files a lazy run needs from the hub: weights, configs, tokenizer (never *.bin / *.pt pickles).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]

# -- checkpoint files ---------------------------------------------------------------------------------
def resolve_checkpoint_dir(name_or_path: str) -> Path:
    """A local directory as is; a hub id is downloaded (safetensors, configs, tokenizer) with
    ``huggingface_hub.snapshot_download``, which honours HF_HUB_OFFLINE and the local cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=HUB_ALLOW_PATTERNS))


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors file(s) of a checkpoint directory: the shards named by the index, or the single file."""
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / SAFE_WEIGHTS_NAME
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{directory} holds no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}; "
                            "lazy loading reads safetensors checkpoints only")


def checkpoint_bytes(directory: Path) -> int:
    """Size on disk of a checkpoint's safetensors files."""
    return sum(f.stat().st_size for f in checkpoint_files(directory))


def as_torch_dtype(dtype: torch.dtype | str | None, config: PretrainedConfig) -> torch.dtype:
    """A concrete dtype: `dtype` itself, or for "auto"/None the checkpoint's (config.dtype), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    declared = getattr(config, "dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    if isinstance(declared, str) and isinstance(getattr(torch, declared, None), torch.dtype):
        return getattr(torch, declared)
    return torch.float32


# -- the skeleton -------------------------------------------------------------------------------------
def build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The causal LM with every parameter and buffer on the meta device (no memory), eager experts (fast on CPU,
    exact everywhere), eval mode."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager")
    return model.eval()


def estimate_model_bytes(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes the whole model takes in memory at `dtype` (counted on a meta skeleton: nothing is read)."""
    model = build_skeleton(config, dtype)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("the decoder layers are not a submodule of the model")


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """transformers draws a "Loading weights" bar per load call; one per layer would flood the log."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def own_memory(module: nn.Module, recurse: bool = True) -> None:
    """Give every tensor of `module` that is a view of a memory-mapped checkpoint file (what safetensors returns for
    a tensor transformers loads unconverted) a copy of its own. Such a view keeps the whole shard mapped, and every
    page of it read so far (the experts too, read for fusing) resident and counted in the process's RSS for as long
    as the module lives: a Qwen3-30B-A3B layer of 1.25 GB held 1.28 GB of file pages besides. A mapped storage is
    the one that cannot be resized."""
    with torch.no_grad():
        for sub in module.modules() if recurse else (module,):
            for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                if tensor is None or tensor.is_meta or tensor.untyped_storage().resizable():
                    continue
                if isinstance(tensor, nn.Parameter):
                    tensor.data = tensor.data.clone()
                else:
                    sub._buffers[name] = tensor.clone()


def _meta_tensors(module: nn.Module, recurse: bool = True) -> list[str]:
    named = list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse))
    return [name for name, t in named if t.is_meta]


class LayerLoader:
    """A model skeleton over a safetensors checkpoint whose decoder layers are materialised one at a time.

    ``model`` holds real embeddings, final norm, lm_head and rotary buffers; its decoder layers stay on the meta
    device for good. ``load(i)`` returns a *new* module for layer ``i`` (so an FP and a quantized copy of the
    same layer can coexist), ``release(layer)`` gives its memory back.
    """

    def __init__(self, checkpoint: str | Path, dtype: torch.dtype | str | None = None):
        self.directory = resolve_checkpoint_dir(str(checkpoint))
        self.files = checkpoint_files(self.directory)
        self.config = AutoConfig.from_pretrained(self.directory)
        self.dtype = as_torch_dtype(dtype, self.config)
        self.model = build_skeleton(self.config, self.dtype)
        self.adapter = get_adapter(self.model)
        self.layers = self.adapter.decoder_layers(self.model)
        self.layers_prefix = _module_path(self.model, self.layers)
        self._load_config = LoadStateDictConfig(dtype=self.dtype,
                                                weight_mapping=get_model_conversion_mapping(self.model))
        self._keys_by_layer = self._index_checkpoint_keys()
        # Exactly what from_pretrained records after a full load (the transforms any checkpoint key matched): it is
        # what revert_weight_conversion undoes when a layer is written back in the checkpoint's own layout.
        self.model._weight_conversions = [t for t in self._load_config.weight_mapping if t.was_used()]
        self._load_non_layer_tensors()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # -- which checkpoint keys belong where -----------------------------------------------------------
    def _index_checkpoint_keys(self) -> dict[int | None, list[tuple[Path, str]]]:
        """Checkpoint keys grouped by the decoder layer they load into (None: outside the layers). Keys are
        renamed with the model's conversion mapping first, since legacy names may differ above the leaf."""
        mapping = self._load_config.weight_mapping
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        meta_state = self.model.state_dict()
        layer_key = re.compile(rf"^{re.escape(self.layers_prefix)}\.(\d+)\.")
        grouped: dict[int | None, list[tuple[Path, str]]] = {}
        for file in self.files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    renamed, _ = rename_source_key(key, renamings, converters, self.model.base_model_prefix, meta_state)
                    match = layer_key.match(renamed)
                    grouped.setdefault(int(match.group(1)) if match else None, []).append((file, key))
        return grouped

    def _load_into_model(self, keys: list[tuple[Path, str]]) -> set[str]:
        """Read `keys` (only those: shards are opened per call and closed after, so no mapping of the whole
        checkpoint stays resident) and load them into the skeleton through transformers' conversion."""
        with contextlib.ExitStack() as stack, _quiet_progress_bars():
            handles = {file: stack.enter_context(safe_open(str(file), framework="pt"))
                       for file in sorted({file for file, _ in keys})}
            state = {key: handles[file].get_slice(key) for file, key in keys}
            info, _ = convert_and_load_state_dict_in_model(self.model, state, self._load_config)
        if info.conversion_errors or info.mismatched_keys:
            raise ValueError(f"cannot load {self.directory}: {info.conversion_errors or info.mismatched_keys}")
        return info.unexpected_keys

    def _load_non_layer_tensors(self) -> None:
        unexpected = self._load_into_model(self._keys_by_layer.get(None, []))
        if unexpected:
            log.debug("checkpoint keys the model does not use: %s", sorted(unexpected))
        own_memory(self.model)
        self.model.tie_weights()  # a tied lm_head points at the now materialised embedding again
        # What the checkpoint does not hold (rotary inv_freq, non-persistent buffers) is created and initialised
        # the way from_pretrained does it: allocated on CPU, then the model's own _init_weights.
        prefix = self.layers_prefix + "."
        for name, module in self.model.named_modules():
            if name == self.layers_prefix or name.startswith(prefix):
                continue
            missing = _meta_tensors(module, recurse=False)
            if missing:
                missing_params = [n for n, _ in module.named_parameters(recurse=False) if n in missing]
                if missing_params:
                    log.warning("%s: %s not in the checkpoint; initialised as the model's init does",
                                name or "model", missing_params)
                module.to_empty(device="cpu", recurse=False)
                self.model._init_weights(module)
        check_finite((n, p) for n, p in self.model.named_parameters() if not p.is_meta)

    # -- one layer ------------------------------------------------------------------------------------
    def _fresh_layer(self, index: int) -> nn.Module:
        return copy.deepcopy(self.layers[index])  # meta tensors: copying costs nothing

    def _check_complete(self, index: int, layer: nn.Module) -> None:
        missing = _meta_tensors(layer)
        if missing:
            raise ValueError(f"{self.directory}: layer {index} lacks {missing} in the checkpoint")

    def load(self, index: int) -> nn.Module:
        """Decoder layer `index` read from the checkpoint, on CPU in the loader's dtype; a new module each call."""
        placeholder = self.layers[index]
        layer = self._fresh_layer(index)
        # transformers' loader writes into the model by key, so the fresh module sits in the slot meanwhile.
        self.layers[index] = layer
        try:
            self._load_into_model(self._keys_by_layer.get(index, []))
        finally:
            self.layers[index] = placeholder
        own_memory(layer)
        self._check_complete(index, layer)
        check_finite((f"{self.layers_prefix}.{index}.{n}", p) for n, p in layer.named_parameters())
        return layer.eval()

    def load_state(self, index: int, state: dict[str, torch.Tensor]) -> nn.Module:
        """Decoder layer `index` from a state dict in the model's own (fused) layout, e.g. a quantized layer the
        pipeline saved; a new module each call."""
        layer = self._fresh_layer(index)
        layer.load_state_dict(state, strict=True, assign=True)
        self._check_complete(index, layer)
        return layer.eval()

    @staticmethod
    def release(layer: nn.Module) -> None:
        """Give a loaded layer's memory back (its tensors return to meta), even if references to it linger."""
        layer.to("meta")

    # -- writing back in the checkpoint layout --------------------------------------------------------
    def checkpoint_tensors(self, index: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Layer `index` (state in the model's layout, layer-relative keys) under the keys and in the layout
        ``save_pretrained`` writes (legacy per-expert tensors)."""
        full = {f"{self.layers_prefix}.{index}.{k}": v for k, v in state.items()}
        return revert_weight_conversion(self.model, full)

    def non_layer_checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Everything outside the decoder layers, as ``save_pretrained`` writes it (tied copies dropped)."""
        prefix = self.layers_prefix + "."
        state = {k: v for k, v in self.model.state_dict().items() if not k.startswith(prefix)}
        for key in self.model._keys_to_ignore_on_save or ():
            state.pop(key, None)
        state = remove_tied_weights_from_state_dict(state, self.model)
        return revert_weight_conversion(self.model, state)


# -- layer sources (see pipeline.LayerSource) ---------------------------------------------------------
class CheckpointLayers:
    """FP decoder layers read from the checkpoint on demand and released after use."""

    in_memory = False

    def __init__(self, loader: LayerLoader):
        self.loader = loader

    def __len__(self) -> int:
        return self.loader.num_layers

    def load(self, index: int) -> nn.Module:
        return self.loader.load(index)

    def release(self, index: int, layer: nn.Module) -> None:
        self.loader.release(layer)


class StoredLayers:
    """Decoder layers read from per-layer state dicts (e.g. the quantized layers in the pipeline's progress
    directory) through `read_state(index)`."""

    in_memory = False

    def __init__(self, loader: LayerLoader, read_state: Callable[[int], dict[str, torch.Tensor]]):
        self.loader = loader
        self.read_state = read_state

    def __len__(self) -> int:
        return self.loader.num_layers

    def load(self, index: int) -> nn.Module:
        return self.loader.load_state(index, self.read_state(index))

    def release(self, index: int, layer: nn.Module) -> None:
        self.loader.release(layer)


# -- writing ------------------------------------------------------------------------------------------
def save_pretrained_layerwise(loader: LayerLoader, read_state: Callable[[int], dict[str, torch.Tensor]],
                              out_dir: Path) -> None:
    """Write the model whose decoder layer i is `read_state(i)` (model layout, layer-relative keys) the way
    ``save_pretrained`` would (config, generation config, safetensors in the checkpoint key layout), holding one
    layer at a time: one shard per layer plus one for everything else, and the index."""
    model = loader.model
    out_dir.mkdir(parents=True, exist_ok=True)
    # The same config edits save_pretrained makes before writing config.json.
    model.config.dtype = str(loader.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)

    n_shards = loader.num_layers + 1
    weight_map: dict[str, str] = {}
    total_size = 0

    def write(shard: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total_size
        name = f"model-{shard:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total_size += sum(v.numel() * v.element_size() for v in tensors.values())

    for index in range(loader.num_layers):
        write(index + 1, loader.checkpoint_tensors(index, read_state(index)))
    write(n_shards, loader.non_layer_checkpoint_tensors())
    index_json = {"metadata": {"total_parameters": model.num_parameters(), "total_size": total_size},
                  "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index_json, indent=2, sort_keys=True) + "\n")
