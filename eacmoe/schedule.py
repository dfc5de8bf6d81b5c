"""Bit schedules: how many bits the experts of each decoder layer get, and the average bits the paper reports.

`--bits 2|3|4|8` gives every layer's experts that width; `--bits 2.5` is the paper's mixed schedule (the first
half of the layers' experts 3-bit, the second half 2-bit); an explicit comma list gives one width per layer.

A per-module schedule (what `--bits auto:B` chooses by default) is the same comma list where a MoE layer's
entry may give one width per routed expert, separated by ``/`` (``2/3/2/4/2/2/3/2``), optionally preceded by the
width of the layer's shared experts and a colon (``3:2/3/2/4/2/2/3/2``); without it the shared experts take the
most common width of the routed ones (the lower one on a tie). `format_schedule` writes that text back exactly.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

ALLOWED_BITS = (2, 3, 4, 8)
_ROUTED_NAME = re.compile(r"^layers\.(\d+)\..*\bexperts\.(\d+)\.[^.]+$")  # the pipeline's routed-expert names


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
    layer_bits, routed = parse_bits_schedule(spec, num_layers)
    if routed is not None:
        raise BitsError(f"--bits {spec!r} gives per-expert widths; this needs one width per layer")
    return layer_bits


def common_width(widths: Iterable[int]) -> int:
    """The most common width (the lower one on a tie): a layer's width when only its routed experts have one."""
    widths = list(widths)
    return min(set(widths), key=lambda b: (-widths.count(b), b))


def _parse_layer_entry(entry: str) -> tuple[int, list[int] | None]:
    """'3' -> (3, None); '2/3/2' -> (2, [2, 3, 2]); '4:2/3/2' -> (4, [2, 3, 2])."""
    if "/" not in entry and ":" not in entry:
        return _check(int(entry)), None
    shared, _, routed_text = entry.rpartition(":")
    routed = [_check(int(b)) for b in routed_text.split("/")]
    return (_check(int(shared)) if shared else common_width(routed)), routed


def parse_bits_schedule(spec: str, num_layers: int) -> tuple[list[int], list[list[int] | None] | None]:
    """The per-layer widths and, for a per-module schedule (module docstring), the per-routed-expert widths of
    each layer (None for a layer given one width; None overall when no layer has any)."""
    spec = str(spec).strip()
    if "/" in spec or ":" in spec:
        entries = spec.split(",")
        if len(entries) != num_layers:
            raise BitsError(f"the per-layer bits list has {len(entries)} entries but the model has {num_layers} layers")
        try:
            parsed = [_parse_layer_entry(e.strip()) for e in entries]
        except BitsError:
            raise
        except ValueError as exc:
            raise BitsError(f"a per-module bits list holds integers, '/' between a layer's experts and ':' after "
                            f"its shared experts' width (got {spec!r})") from exc
        return [b for b, _ in parsed], [r for _, r in parsed]
    return _parse_uniform_or_layers(spec, num_layers), None


def format_schedule(layer_bits: list[int], routed: list[list[int] | None] | None = None) -> str:
    """The text `parse_bits_schedule` reads back as (layer_bits, routed)."""
    return _format_entries(layer_bits, routed, lambda experts: "/".join(map(str, experts)))


def format_schedule_means(layer_bits: list[int], routed: list[list[int] | None] | None = None) -> str:
    """`format_schedule` with each layer's routed widths as their mean ('4:3/4/2,2' -> '4:3.00,2'): a per-module
    schedule short enough for one line."""
    return _format_entries(layer_bits, routed, lambda experts: f"{sum(experts) / len(experts):.2f}")


def _format_entries(layer_bits: list[int], routed: list[list[int] | None] | None, experts_text) -> str:
    """One entry per layer: its width, or its routed experts' text, after the layer's width and a colon where that
    is not their most common width (the shared experts' own)."""
    entries = []
    for i, b in enumerate(layer_bits):
        experts = routed[i] if routed is not None else None
        if experts is None:
            entries.append(str(b))
        else:
            text = experts_text(experts)
            entries.append(text if b == common_width(experts) else f"{b}:{text}")
    return ",".join(entries)


def check_expert_counts(routed: list[list[int] | None] | None, num_experts: list[int | None]) -> None:
    """Each per-expert entry has one width per routed expert of its layer (num_experts[i] None: a dense layer)."""
    for i, (widths, n) in enumerate(zip(routed or [], num_experts)):
        if widths is None:
            continue
        if n is None:
            raise BitsError(f"--bits: layer {i} is dense (no routed experts) but its entry gives per-expert widths")
        if len(widths) != n:
            raise BitsError(f"--bits: layer {i} has {n} routed experts but its entry gives {len(widths)} widths")


def _parse_uniform_or_layers(spec: str, num_layers: int) -> list[int]:
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
    module_bits: dict[str, int] = field(default_factory=dict)  # name -> bits of every matrix added with a name
    expert_params: int = 0          # of quantized_params: the expert weights (routed, shared, dense MLPs)
    expert_bits: float = 0.0        # their code bits

    def add_quantized(self, rows: int, columns: int, bits: int, group_size: int, name: str | None = None,
                      expert: bool = False) -> None:
        """One quantized [rows, columns] matrix; `expert`: it is an expert weight (not attention)."""
        groups = rows * (1 if group_size == -1 else columns // group_size)
        self.quantized_params += rows * columns
        self.quantized_bits += rows * columns * bits
        self.overhead_bits += groups * (16 + bits)
        if name is not None:
            self.module_bits[name] = bits
        if expert:
            self.expert_params += rows * columns
            self.expert_bits += rows * columns * bits

    @property
    def expert_average_bits(self) -> float:
        """Code bits per expert weight (routed + shared experts and dense MLPs): what `--bits auto:B` budgets."""
        return self.expert_bits / max(1, self.expert_params)

    def routed_expert_table(self, num_layers: int) -> list[list[int] | None]:
        """Per decoder layer, the width of each routed expert as quantized (from the names
        ``layers.{i}.<block>.experts.{e}.<proj>``), None for a layer without routed experts; an expert whose
        projections differ gets the widest."""
        table: list[dict[int, int]] = [{} for _ in range(num_layers)]
        for name, bits in self.module_bits.items():
            match = _ROUTED_NAME.match(name)
            if match:
                layer, expert = int(match.group(1)), int(match.group(2))
                table[layer][expert] = max(bits, table[layer].get(expert, 0))
        return [[t[e] for e in sorted(t)] if t else None for t in table]

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
