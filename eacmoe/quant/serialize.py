"""Sets of QuantizedWeight as flat tensor dicts for safetensors (no pickles), as the per-layer progress files of
--resume store them: `<name>.codes`, `.scales`, `.zeros`, `.g_idx` and `.meta` (int32 [bits, group_size, sym])."""
from __future__ import annotations

import torch

from .grid import QuantizedWeight

_FIELDS = ("codes", "scales", "zeros", "g_idx")


def quantized_tensors(quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """Flatten {name: QuantizedWeight} into {"name.field": tensor}."""
    tensors = {}
    for name, qw in quantized.items():
        for f in _FIELDS:
            tensors[f"{name}.{f}"] = getattr(qw, f).contiguous().cpu()
        tensors[f"{name}.meta"] = torch.tensor([qw.bits, qw.group_size, int(qw.sym)], dtype=torch.int32)
    return tensors


def quantized_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
    """Inverse of quantized_tensors."""
    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".meta")})
    out = {}
    for name in names:
        bits, group_size, sym = (int(v) for v in tensors[f"{name}.meta"])
        out[name] = QuantizedWeight(**{f: tensors[f"{name}.{f}"] for f in _FIELDS}, bits=bits, group_size=group_size,
                                    sym=bool(sym))
    return out
