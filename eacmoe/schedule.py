"""Bit schedules: how many bits the experts of each decoder layer get, and the average bits the paper reports.

`--bits 2|3|4|8` gives every layer's experts that width; `--bits 2.5` is the paper's mixed schedule (the first
half of the layers' experts 3-bit, the second half 2-bit); an explicit comma list gives one width per layer.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

ALLOWED_BITS = (2, 3, 4, 8)


class BitsError(ValueError):
    """An invalid bits or group-size specification."""


def _check(bits: int) -> int:
    if bits not in ALLOWED_BITS:
        raise BitsError(f"bits must be one of {', '.join(map(str, ALLOWED_BITS))} (got {bits})")
    return bits


def check_group_size(group_size: int, widths: Iterable[int]) -> None:
    """`--group-size` must be -1 (one group per output row) or a positive divisor of every quantized input width
    (a partial last group has no packed layout here); the one check of `eacmoe.quantize` and `eacmoe.plan`."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
        raise BitsError(f"--group-size must be -1 (per channel) or a positive integer (got {group_size!r})")
    widths = sorted(set(widths))
    bad = [w for w in widths if group_size != -1 and w % group_size]
    if bad:
        raise BitsError(f"--group-size {group_size} does not divide the input width(s) {bad} of this model; "
                        f"use a divisor of {math.gcd(*widths)} or -1 (per channel)")


def parse_expert_bits(spec: str, num_layers: int) -> list[int]:
    """Per-layer expert bit widths from '2', '2.5' or '3,3,2,2,...' (one entry per decoder layer)."""
    spec = str(spec).strip()
    if "," in spec:
        try:
            widths = [int(s) for s in spec.split(",")]
        except ValueError as exc:
            raise BitsError(f"a per-layer bits list must hold integers (got {spec!r})") from exc
        if len(widths) != num_layers:
            raise BitsError(f"the per-layer bits list has {len(widths)} entries but the model has {num_layers} layers")
        return [_check(b) for b in widths]
    if spec == "2.5":
        half = (num_layers + 1) // 2
        return [3] * half + [2] * (num_layers - half)
    try:
        value = float(spec)
    except ValueError as exc:
        raise BitsError(f"--bits must be 2, 2.5, 3, 4, 8 or a per-layer list (got {spec!r})") from exc
    if value != int(value):
        raise BitsError(f"--bits must be 2, 2.5, 3, 4, 8 or a per-layer list (got {spec!r})")
    return [_check(int(value))] * num_layers


@dataclass
class BitsAccount:
    """Weights counted by role, for the average-bits figures."""
    quantized_params: int = 0       # decoder Linear weights that were quantized (attention + experts + shared)
    quantized_bits: float = 0.0     # their total bits (codes only)
    overhead_bits: float = 0.0      # scales (fp16) and zero points of all groups
    fp_params: int = 0              # everything kept in 16-bit (embeddings, head, norms, routers, unquantized)

    def add_quantized(self, rows: int, columns: int, bits: int, group_size: int) -> None:
        groups = rows * (1 if group_size == -1 else columns // group_size)
        self.quantized_params += rows * columns
        self.quantized_bits += rows * columns * bits
        self.overhead_bits += groups * (16 + bits)

    @property
    def paper_average_bits(self) -> float:
        """Bits per quantized decoder weight, as EAC-MoE reports (2.06 / 2.54 / 3.03 for Mixtral)."""
        return self.quantized_bits / max(1, self.quantized_params)

    @property
    def true_average_bits(self) -> float:
        """Bits per parameter of the whole model, scales, zeros and 16-bit tensors included."""
        total = self.quantized_params + self.fp_params
        return (self.quantized_bits + self.overhead_bits + 16 * self.fp_params) / max(1, total)

    @property
    def size_bytes(self) -> int:
        return int((self.quantized_bits + self.overhead_bits + 16 * self.fp_params) / 8)
