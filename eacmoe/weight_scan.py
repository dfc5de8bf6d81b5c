"""One pass over a model's weights before it is quantized: refuse NaN / Inf, and fingerprint the model for --resume.

Both need every tensor once, so they share the pass. Decoder layers are read through a `LayerSource`, one at a
time. For a lazily loaded checkpoint that costs exactly one lazy read of every layer, before the first layer is
quantized, instead of finding a NaN in layer 30 hours in: on the bundled tiny-mixtral (37 MB of bfloat16 on disk)
0.075 s with --lazy on one core (best of 7), no more than the loader takes to read the layers once (the
finiteness test is a sum, a tenth of the cost of `isfinite`). It grows with the checkpoint's bytes: at that rate,
0.5 GB/s of checkpoint per core, a 93 GB Mixtral-8x7B would take minutes, against hours of quantization. For a
model in memory it is one pass over memory.

The fingerprint hashes the config (minus where it was loaded from) and, for every tensor in the model's own
layout, its name, dtype, shape and 64 values evenly spaced over it. Another checkpoint of the same architecture
(other training, another seed, a fine-tune) differs in every one of those samples; the same weights loaded
lazily or whole, or from another directory, give the same fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import get_adapter

log = logging.getLogger(__name__)

SAMPLES_PER_TENSOR = 64
# Config entries that say where or how a checkpoint was loaded, not what it is.
_CONFIG_KEYS_IGNORED = ("transformers_version", "dtype", "torch_dtype")


class NonFiniteWeightsError(ValueError):
    """A checkpoint tensor holds NaN or Inf values (quantizing it would silently produce garbage)."""


def _all_finite(tensor: torch.Tensor) -> bool:
    # NaN and Inf propagate into a sum, so a finite sum proves every value finite, at a tenth of the cost of
    # isfinite; only a non-finite sum (or one that overflowed on large finite values) needs the exact check.
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    for name, tensor in tensors:
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise NonFiniteWeightsError(f"weight {name} holds NaN or Inf values; refusing to quantize")


@dataclass
class WeightScan:
    fingerprint: str   # 16 hex digits
    tensors: int
    bytes: int
    seconds: float


def _config_digest(config) -> bytes:
    fields = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _CONFIG_KEYS_IGNORED}
    return json.dumps(fields, sort_keys=True, default=str).encode()


def _sample(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    if flat.numel() > SAMPLES_PER_TENSOR:
        # float32 positions (the fingerprints already written) while they are exact; beyond 2**24 elements (a
        # Mixtral-8x7B or Qwen3-30B-A3B fused expert tensor) float32 rounds the last position past the end
        dtype = torch.float32 if flat.numel() <= 2**24 else torch.float64
        flat = flat[torch.linspace(0, flat.numel() - 1, SAMPLES_PER_TENSOR, dtype=dtype).round().long()]
    return flat.contiguous().view(torch.uint8).numpy().tobytes()


def scan_weights(model: nn.Module, layers) -> WeightScan:
    """Check every tensor of `model` for NaN / Inf and fingerprint it. Decoder layer i is read with `layers.load(i)`
    (a `pipeline.LayerSource`) and given back with `layers.release`, so at most one layer is in memory; the decoder
    layers of `model` itself (on meta when loaded lazily) are not read."""
    t0 = time.perf_counter()
    decoder_layers = get_adapter(model).decoder_layers(model)
    layers_prefix = next(name for name, module in model.named_modules() if module is decoder_layers)
    digest = hashlib.sha256(_config_digest(model.config))
    count = nbytes = 0

    def add(named: Iterable[tuple[str, torch.Tensor]]) -> None:
        nonlocal count, nbytes
        named = sorted(named)
        check_finite(named)
        for name, tensor in named:
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(_sample(tensor))
            count += 1
            nbytes += tensor.numel() * tensor.element_size()

    outside = [(n, t) for n, t in model.state_dict().items()
               if not n.startswith(layers_prefix + ".") and not t.is_meta]
    add(outside)
    for index in range(len(layers)):
        layer = layers.load(index)
        try:
            add((f"{layers_prefix}.{index}.{n}", t) for n, t in layer.state_dict().items())
        finally:
            layers.release(index, layer)
    scan = WeightScan(digest.hexdigest()[:16], count, nbytes, time.perf_counter() - t0)
    log.info("checked %d tensors (%.2f GB) for NaN/Inf and fingerprinted them in %.2f s (%s)", scan.tensors,
             scan.bytes / 1e9, scan.seconds, "in memory" if layers.in_memory else "one read of the checkpoint")
    return scan
