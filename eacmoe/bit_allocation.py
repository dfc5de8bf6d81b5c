"""`--bits auto:B`: expert bits from {2, 3, 4}, per routed expert (the default) or per layer, chosen by a knapsack
under an average-bits budget.

**Budget.** B is the average bits over the weights the per-layer expert width governs: routed experts, shared
experts and dense MLPs of every decoder layer (attention has its own `--attn-bits`). Each layer's count is its real
parameter count (`layer_expert_params`), so layers of different size cost what they weigh, and the allocation
satisfies ``sum_l params_l * bits_l <= B * sum_l params_l`` exactly (integer arithmetic, B read as a decimal
fraction). With equal layers, `auto:2.5` gives half of them 3 bits, as the paper's 2.5 does, but chooses which.

**Objective.** Minimise the predicted sum of per-layer losses. A layer's loss at 2 bits is its *sensitivity*;
from 2 bits on it shrinks ``ERROR_SHRINK_PER_BIT`` = 4x per extra bit (one bit halves the quantization step, so
the squared error falls about 4x): ``loss_l(b) = s_l * 4^-(b - 2)``. Sensitivities come from

- a sensitivity file (`--sensitivity FILE`, ``sensitivity.json`` of ``python -m eacmoe.eval --sensitivity``): each
  layer's ``score``, the KL to FP of the model with only that layer's routed experts GPTQ-quantized at 2 bits
  (``score_perturbation`` must be ``gptq@2``), plus its ``shared`` score (its shared experts alone) where the file
  has one; a dense layer (no score) gets the median score of the others; or
- when no file is given, a proxy computed in the run (`proxy_sensitivities`): one FP pass over the calibration
  tokens, and per layer the energy of the block output's change when its experts are RTN-quantized at 2 bits,
  relative to the energy of the residual stream leaving the layer. Measured against the files: docs/QUANTIZING.md.

**Per expert** (the default of `--bits auto:B`; `--no-per-expert-bits` keeps one width per layer;
`allocate_per_expert`): the same knapsack over modules instead of layers: each
routed expert of each layer is an item (its own parameter count and sensitivity), and each layer's shared experts
or dense MLP one more item (the layer's width in the schedule). The budget is the same sum over the same weights, so
the average over the expert weights is again at most B exactly. Per-module sensitivities come from

- the sensitivity file's per-expert cells (``layers[i].experts[e].score``: the KL with only that expert 2-bit GPTQ;
  ``python -m eacmoe.eval --sensitivity`` measures them unless ``--no-per-expert``); a layer without them gets its
  ``score`` split among its experts in proportion to the in-run proxy below; a layer's shared experts their own
  ``shared`` cell where the file has one, else (files measured before those cells; ``score`` covers the routed
  experts only) ``score x proxy(shared) / sum_e proxy(e)``; a dense layer the median as above. Where the proxy
  cannot run (a lazily loaded model) the split falls back to the experts' ``selection_frequency`` share and shared
  experts to the layer's score, a poor guess (measured in docs/QUANTIZING.md); or
- without a file, `proxy_expert_sensitivities`: the per-layer proxy made per module, one FP pass: expert e's
  ``sum_t g_{t,e}^2 |E_e^RTN2(x_t) - E_e(x_t)|^2`` over the tokens routed to it (g: its combine weight), the shared
  experts' output change likewise, each over the energy of the layer's output. Measured against the file's per-expert
  cells: docs/QUANTIZING.md.

The knapsack is solved exactly by dynamic programming over the extra bits above 2, in units of the gcd of the
layer sizes (coarsened, always rounding the cost up so the budget still holds, only when that table would exceed
``MAX_DP_CELLS``).
"""
from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from .adapters import get_adapter
from .schedule import common_width, format_schedule

log = logging.getLogger(__name__)

AUTO_PREFIX = "auto:"
AUTO_CHOICES = (2, 3, 4)
ERROR_SHRINK_PER_BIT = 4.0
MAX_DP_CELLS = 20_000_000
SENSITIVITY_SCHEMA = "eacmoe.sensitivity/1"


class AllocationError(ValueError):
    """A bad `--bits auto:B` or sensitivity file; the message is one line for the user."""


def is_auto_bits(spec: str) -> bool:
    return str(spec).strip().startswith(AUTO_PREFIX)


def parse_auto_budget(spec: str) -> Fraction:
    """B of "auto:B" as an exact fraction (2 <= B <= 4)."""
    text = str(spec).strip().removeprefix(AUTO_PREFIX)
    try:
        budget = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise AllocationError(f"--bits auto:B needs a number B between 2 and 4 (got {spec!r})") from None
    if not min(AUTO_CHOICES) <= budget <= max(AUTO_CHOICES):
        raise AllocationError(f"--bits auto:B needs {min(AUTO_CHOICES)} <= B <= {max(AUTO_CHOICES)} (got {spec!r})")
    return budget


def predicted_losses(sensitivity: float, choices: Sequence[int] = AUTO_CHOICES,
                     shrink: float = ERROR_SHRINK_PER_BIT) -> dict[int, float]:
    """loss(b) = s * shrink^-(b - min(choices)) for every choice."""
    low = min(choices)
    return {b: sensitivity * shrink ** -(b - low) for b in choices}


def allocate_bits(params: Sequence[int], losses: Sequence[Mapping[int, float]], budget: Fraction | float) -> list[int]:
    """The bits per layer (keys of each ``losses[l]``) that minimise ``sum_l losses[l][b_l]`` subject to
    ``sum_l params[l] * b_l <= budget * sum_l params[l]``, exactly. Ties go to fewer bits, then to earlier layers."""
    if len(params) != len(losses) or not params:
        raise ValueError("one parameter count and one loss table per layer are needed")
    if any(p < 0 for p in params):
        raise ValueError("parameter counts must be >= 0")
    choices = sorted(set().union(*(set(l) for l in losses)))
    if any(set(l) != set(choices) for l in losses):
        raise ValueError("every layer needs a loss for every bit width")
    budget = Fraction(budget) if not isinstance(budget, Fraction) else budget
    low = choices[0]
    total = sum(params)
    capacity_bits = math.floor(budget * total) - low * total  # extra bit-parameters above the lowest width
    if capacity_bits < 0:
        raise AllocationError(f"a budget of {float(budget):g} bits is below the lowest width {low}")
    unit = math.gcd(*[p for p in params if p]) or 1
    capacity = capacity_bits // unit
    steps = [c - low for c in choices]
    if capacity * len(params) > MAX_DP_CELLS:  # coarsen: costs rounded up, so the budget still holds
        unit = math.ceil(capacity_bits * len(params) / MAX_DP_CELLS)
        capacity = capacity_bits // unit
    costs = [[math.ceil(p * s / unit) for s in steps] for p in params]
    inf = float("inf")
    # best[c] = least loss of the layers so far using at most c units; choice[l][c] = width index picked
    best = [0.0] * (capacity + 1)
    picks: list[list[int]] = []
    for layer, table in enumerate(losses):
        new = [inf] * (capacity + 1)
        pick = [0] * (capacity + 1)
        for c in range(capacity + 1):
            for k, bits in enumerate(choices):
                cost = costs[layer][k]
                if cost > c:
                    continue
                value = best[c - cost] + table[bits]
                if value < new[c]:  # strict: on a tie the fewer bits (earlier choice) stay
                    new[c], pick[c] = value, k
        best = new
        picks.append(pick)
    c = capacity
    result = [0] * len(params)
    for layer in range(len(params) - 1, -1, -1):
        k = picks[layer][c]
        result[layer] = choices[k]
        c -= costs[layer][k]
    assert sum(p * b for p, b in zip(params, result)) <= budget * total
    return result


def layer_expert_params(model: nn.Module) -> list[int]:
    """Per decoder layer, the weights its expert width governs: routed + shared experts, or the dense MLP (a meta
    skeleton is enough)."""
    adapter = get_adapter(model)
    counts = []
    for layer in adapter.decoder_layers(model):
        block = adapter.moe_block(layer)
        if block is None:
            groups = adapter.dense_mlp_linears(layer)
            counts.append(sum(linear.weight.numel() for group in groups for _, linear in group))
            continue
        routed = sum(w.numel() for w in adapter.expert_weights(block, 0).values()) * adapter.num_experts(block)
        shared = sum(linear.weight.numel() for group in adapter.shared_experts(block) for _, linear in group)
        counts.append(routed + shared)
    return counts


@dataclass(frozen=True)
class LayerModules:
    """The weights one decoder layer's expert widths govern, as knapsack items: the parameter count of each routed
    expert (empty for a dense layer), and of the rest, the shared experts or the dense MLP (0: none)."""
    routed: tuple[int, ...]
    rest: int

    @property
    def total(self) -> int:
        return sum(self.routed) + self.rest


@dataclass(frozen=True)
class ModuleSensitivity:
    """A layer's 2-bit sensitivities per module, aligned with `LayerModules`."""
    routed: tuple[float, ...]
    rest: float


def layer_modules(model: nn.Module) -> list[LayerModules]:
    """`LayerModules` of every decoder layer (a meta skeleton is enough); their totals are `layer_expert_params`."""
    adapter = get_adapter(model)
    result = []
    for layer in adapter.decoder_layers(model):
        block = adapter.moe_block(layer)
        if block is None:
            groups = adapter.dense_mlp_linears(layer)
            result.append(LayerModules((), sum(linear.weight.numel() for group in groups for _, linear in group)))
            continue
        routed = tuple(sum(w.numel() for w in adapter.expert_weights(block, e).values())
                       for e in range(adapter.num_experts(block)))
        shared = sum(linear.weight.numel() for group in adapter.shared_experts(block) for _, linear in group)
        result.append(LayerModules(routed, shared))
    return result


@dataclass
class Allocation:
    """An `auto:B` schedule and where it came from (recorded in report.json)."""
    spec: str
    bits: list[int]              # per layer (with per-expert bits: its shared experts' / dense MLP's width)
    budget: float
    achieved_average: float      # sum params * bits / sum params, over the expert weights
    params: list[int]
    sensitivities: list[float]
    source: str                  # the sensitivity file, or "proxy: ..."
    rule: str = f"loss(b) = s * {ERROR_SHRINK_PER_BIT:g}^-(b-2), bits in {AUTO_CHOICES}"
    expert_bits: list[list[int] | None] | None = None     # per-expert allocation: per layer, each routed expert's width
    expert_sensitivities: list[list[float] | None] | None = None

    def as_dict(self) -> dict:
        return {**asdict(self), "schedule": self.schedule}

    @property
    def per_expert(self) -> bool:
        return self.expert_bits is not None

    @property
    def schedule(self) -> str:
        """The comma list `--bits` and `python -m eacmoe.plan --bits` accept for the same schedule (per-module
        entries `s:e0/e1/...` with per-expert bits, see eacmoe/schedule.py)."""
        return format_schedule(self.bits, self.expert_bits)


def read_sensitivity_file(path: Path, num_layers: int, fingerprint: str | None = None) -> list[float]:
    """Per-layer 2-bit sensitivities from a sensitivity.json; AllocationError when it does not fit the model."""
    return _layer_scores(_read_sensitivity_doc(path, num_layers, fingerprint), path)


def _read_sensitivity_doc(path: Path, num_layers: int, fingerprint: str | None) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise AllocationError(f"--sensitivity {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SENSITIVITY_SCHEMA:
        raise AllocationError(f"--sensitivity {path}: not a sensitivity file (schema {SENSITIVITY_SCHEMA} expected)")
    if doc.get("score_perturbation") != "gptq@2":
        raise AllocationError(f"--sensitivity {path}: its scores are {doc.get('score_perturbation')!r}, not 2-bit GPTQ "
                              "(run python -m eacmoe.eval --sensitivity with GPTQ cells)")
    layers = doc.get("layers") or []
    if len(layers) != num_layers:
        raise AllocationError(f"--sensitivity {path} has {len(layers)} layers, the model {num_layers}")
    if fingerprint is not None and doc.get("fingerprint") != fingerprint:
        raise AllocationError(f"--sensitivity {path} was measured on other weights (fingerprint "
                              f"{doc.get('fingerprint')}, this model {fingerprint})")
    return doc


def _shared_score(entry: dict) -> float | None:
    """A layer's measured shared-expert sensitivity (its ``L<L>:shared`` cell), or None."""
    shared = entry.get("shared")
    return None if not shared else max(0.0, float(shared["score"]))


def _layer_scores(doc: dict, path: Path, with_shared: bool = True) -> list[float]:
    """Per-layer 2-bit sensitivities: routed experts' ``score`` (+ the measured shared experts' with_shared); a
    dense layer gets the median of the others."""
    scores = [None if layer.get("score") is None
              else max(0.0, float(layer["score"])) + ((_shared_score(layer) or 0.0) if with_shared else 0.0)
              for layer in doc["layers"]]
    known = [s for s in scores if s is not None]
    if not known:
        raise AllocationError(f"--sensitivity {path} holds no layer scores")
    fill = statistics.median(known)
    return [fill if s is None else s for s in scores]


def file_needs_proxy(path: Path, modules: Sequence[LayerModules], fingerprint: str | None = None) -> bool:
    """Whether the file leaves a per-module sensitivity to the in-run proxy: a MoE layer without per-expert cells,
    or with shared experts but no shared cell."""
    doc = _read_sensitivity_doc(path, len(modules), fingerprint)
    return any(m.routed and ((m.rest and _shared_score(entry) is None) or not entry.get("experts"))
               for entry, m in zip(doc["layers"], modules))


def read_expert_sensitivities(path: Path, modules: Sequence[LayerModules], fingerprint: str | None = None,
                              proxy: Sequence[ModuleSensitivity] | None = None
                              ) -> tuple[list[ModuleSensitivity], str]:
    """Per-module 2-bit sensitivities from a sensitivity.json (module docstring, "Per expert") and how they were
    obtained (for the report). `proxy` (`proxy_expert_sensitivities`), when given, splits the layer score of a layer
    without per-expert cells among its experts and sets its shared experts relative to its routed ones."""
    doc = _read_sensitivity_doc(path, len(modules), fingerprint)
    scores = _layer_scores(doc, path, with_shared=False)
    result, measured, by_proxy, split, shared_cells, shared_by_proxy = [], 0, 0, 0, 0, 0
    for i, (entry, layer, score) in enumerate(zip(doc["layers"], modules, scores)):
        n = len(layer.routed)
        cells = entry.get("experts") or []
        guess = proxy[i] if proxy is not None and sum(proxy[i].routed) > 0 else None
        rest, shared_cell = score, _shared_score(entry)
        if n and layer.rest and shared_cell is not None:
            rest = shared_cell
            shared_cells += 1
        elif n and guess is not None and layer.rest:  # the file's score covers the routed experts only
            rest = score * guess.rest / sum(guess.routed)
            shared_by_proxy += 1
        if n and cells:
            if sorted(int(c["expert"]) for c in cells) != list(range(n)):
                raise AllocationError(f"--sensitivity {path}: layer {i} has per-expert cells for "
                                      f"{len(cells)} experts, the model {n}")
            by_expert = {int(c["expert"]): max(0.0, float(c["score"])) for c in cells}
            routed = tuple(by_expert[e] for e in range(n))
            measured += 1
        elif n and guess is not None:
            routed = tuple(score * r / sum(guess.routed) for r in guess.routed)
            by_proxy += 1
        elif n:
            share = entry.get("selection_frequency") or [1.0 / n] * n
            if len(share) != n:
                raise AllocationError(f"--sensitivity {path}: layer {i} has selection frequencies for "
                                      f"{len(share)} experts, the model {n}")
            routed = tuple(score * float(f) for f in share)
            split += 1
        else:
            routed = ()
        result.append(ModuleSensitivity(routed, rest))
    parts = [f"per-expert cells in {measured} layers"]
    if by_proxy:
        parts.append(f"layer score split by the in-run per-module proxy in {by_proxy}")
    if split:
        parts.append(f"layer score x selection frequency in {split}")
    if shared_cells:
        parts.append(f"shared-expert cells in {shared_cells}")
    if shared_by_proxy:
        parts.append("shared experts: layer score x their proxy / the routed experts' proxy")
    return result, f"{path} ({'; '.join(parts)})"


def allocate_per_expert(spec: str, modules: Sequence[LayerModules], sensitivities: Sequence[ModuleSensitivity],
                        source: str) -> Allocation:
    """The per-expert `auto:B` schedule: one knapsack over every routed expert and every layer's rest."""
    if len(modules) != len(sensitivities):
        raise ValueError("one sensitivity per layer is needed")
    budget = parse_auto_budget(spec)
    items: list[tuple[int, int | None]] = []   # (layer, routed expert or None for the rest)
    params: list[int] = []
    losses: list[dict[int, float]] = []
    for i, (layer, sens) in enumerate(zip(modules, sensitivities)):
        if len(sens.routed) != len(layer.routed):
            raise ValueError(f"layer {i}: {len(sens.routed)} expert sensitivities for {len(layer.routed)} experts")
        for e, (p, s) in enumerate(zip(layer.routed, sens.routed)):
            items.append((i, e))
            params.append(p)
            losses.append(predicted_losses(s))
        if layer.rest:
            items.append((i, None))
            params.append(layer.rest)
            losses.append(predicted_losses(sens.rest))
    chosen = dict(zip(items, allocate_bits(params, losses, budget)))
    table: list[list[int] | None] = []
    layer_bits: list[int] = []
    for i, layer in enumerate(modules):
        routed = [chosen[(i, e)] for e in range(len(layer.routed))]
        table.append(routed or None)
        layer_bits.append(chosen[(i, None)] if layer.rest else common_width(routed))
    achieved = sum(p * b for p, b in zip(params, chosen.values())) / sum(params)
    return Allocation(spec=spec, bits=layer_bits, budget=float(budget), achieved_average=achieved,
                      params=[m.total for m in modules], sensitivities=[sum(s.routed) + s.rest for s in sensitivities],
                      source=source, expert_bits=table,
                      expert_sensitivities=[list(s.routed) or None for s in sensitivities])


def allocation_from_sensitivities(spec: str, params: Sequence[int], sensitivities: Sequence[float],
                                  source: str) -> Allocation:
    budget = parse_auto_budget(spec)
    bits = allocate_bits(params, [predicted_losses(s) for s in sensitivities], budget)
    achieved = sum(p * b for p, b in zip(params, bits)) / sum(params)
    return Allocation(spec=spec, bits=bits, budget=float(budget), achieved_average=achieved, params=list(params),
                      sensitivities=list(sensitivities), source=source)


def auto_expert_bits(spec: str, model: nn.Module, sensitivity: Path | None = None,
                     calib_ids: torch.Tensor | None = None, fingerprint: str | None = None,
                     batch_size: int = 8, group_size: int = 128, per_expert: bool | None = False) -> Allocation:
    """The `auto:B` schedule of `model` from a sensitivity file, or (no file) from the in-run proxy on `calib_ids`;
    per layer (`per_expert` False), per routed expert (True), or None (the CLI's default): per routed expert unless
    the file lacks per-expert (or shared) cells and the proxy that would split its layer scores cannot run (a lazily
    loaded model, RTN without calibration tokens), where per layer from the file beats a frequency split."""
    if per_expert is not False:
        modules = layer_modules(model)
        if sensitivity is not None:
            proxy = None
            if file_needs_proxy(sensitivity, modules, fingerprint):
                if calib_ids is not None and calib_ids.numel():
                    proxy = proxy_expert_sensitivities(model, calib_ids, batch_size=batch_size, group_size=group_size)
                elif per_expert is None:
                    log.info("%s lacks per-expert cells for some layers (or the model has shared experts) and the "
                             "in-run proxy cannot run here: allocating per layer from the file's layer scores "
                             "(--per-expert-bits would split them by selection frequency, a poor guess; "
                             "docs/QUANTIZING.md)", sensitivity)
                    return auto_expert_bits(spec, model, sensitivity, calib_ids, fingerprint, batch_size, group_size,
                                            per_expert=False)
                else:
                    log.warning("per-expert allocation: %s lacks per-expert cells for some layers (or the model has "
                                "shared experts) and the in-run proxy cannot run here; splitting those layers' scores "
                                "by selection frequency, a poor guess (docs/QUANTIZING.md); --no-per-expert-bits "
                                "allocates per layer from the file instead", sensitivity)
            scores, how = read_expert_sensitivities(sensitivity, modules, fingerprint, proxy)
            return allocate_per_expert(spec, modules, scores, how)
        if calib_ids is None:
            raise AllocationError("--bits auto:B without --sensitivity needs calibration tokens for its proxy")
        scores = proxy_expert_sensitivities(model, calib_ids, batch_size=batch_size, group_size=group_size)
        return allocate_per_expert(spec, modules, scores, f"proxy: {EXPERT_PROXY_DESCRIPTION}")
    params = layer_expert_params(model)
    if sensitivity is not None:
        scores = read_sensitivity_file(sensitivity, len(params), fingerprint)
        return allocation_from_sensitivities(spec, params, scores, str(sensitivity))
    if calib_ids is None:
        raise AllocationError("--bits auto:B without --sensitivity needs calibration tokens for its proxy")
    scores = proxy_sensitivities(model, calib_ids, batch_size=batch_size, group_size=group_size)
    return allocation_from_sensitivities(spec, params, scores, f"proxy: {PROXY_DESCRIPTION}")


PROXY_DESCRIPTION = "RTN 2-bit block-output error energy / energy of the layer's output, FP stream"
EXPERT_PROXY_DESCRIPTION = ("per module: RTN 2-bit error energy of its combine-weighted output / energy of the "
                            "layer's output, FP stream")


@torch.no_grad()
def _proxy_setup(model: nn.Module, calib_ids: torch.Tensor, batch_size: int, group_size: int,
                 device: torch.device | str):
    """What both RTN proxies start from: the adapter, the device, the FP stream entering layer 0 with the layer
    kwargs, and 2-bit round-to-nearest of a weight (dequantized in its dtype)."""
    from .pipeline import capture_layer_inputs  # no cycle at import
    from .quant import QuantSpec, rtn_quantize

    adapter = get_adapter(model)
    device = torch.device(device)
    stream, layer_kwargs = capture_layer_inputs(model, adapter, calib_ids, batch_size, device)
    spec = QuantSpec(bits=2, group_size=group_size)

    def rtn(w: torch.Tensor) -> torch.Tensor:
        return rtn_quantize(w, spec).dequantize().to(w.dtype)

    return adapter, device, stream, layer_kwargs, rtn


@torch.no_grad()  # the stream would otherwise carry every layer's autograd graph along (all activations)
def proxy_sensitivities(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8,
                        group_size: int = 128, device: torch.device | str = "cpu") -> list[float]:
    """Per decoder layer: sum_t |block_RTN2(x_t) - block(x_t)|^2 / sum_t |h_t|^2 on the FP stream (h: the residual
    stream leaving the layer, x: the block input), the routed experts (and shared experts / dense MLP) round-to-
    nearest at 2 bits, routing unchanged. Cheap: one FP pass, no GPTQ."""
    from .pipeline import _first, _kwargs_for, capture_module_input  # no cycle at import

    adapter, device, stream, layer_kwargs, rtn = _proxy_setup(model, calib_ids, batch_size, group_size, device)

    scores = []
    for layer in adapter.decoder_layers(model):
        layer.to(device)
        block = adapter.moe_block(layer)
        mlp = block if block is not None else layer.mlp
        x = capture_module_input(layer, mlp, stream, layer_kwargs, batch_size, device)
        reference, quantized = _block_outputs(adapter, block if block is not None else mlp, block is not None, x, rtn)
        change = float((quantized.double() - reference.double()).square().sum())
        outputs = []
        for start in range(0, stream.shape[0], batch_size):
            batch = stream[start:start + batch_size].to(device)
            outputs.append(_first(layer(batch, **_kwargs_for(layer_kwargs, batch.shape[0], device))).cpu())
        stream = torch.cat(outputs)
        scores.append(change / max(float(stream.double().square().sum()), 1e-30))
        layer.to("cpu")
    return scores


def _block_outputs(adapter, mlp: nn.Module, moe: bool, x: torch.Tensor, rtn) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's output on x [T, H] as it is and with its matrices RTN-quantized (on a copy; the FP routing
    is kept, so the proxy measures the experts alone)."""
    import copy

    quantized = copy.deepcopy(mlp)
    if not moe:
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(quantized, name).weight.data = rtn(getattr(quantized, name).weight.data)
        return mlp(x), quantized(x)
    for e in range(adapter.num_experts(quantized)):
        adapter.set_expert_weights(quantized, e, {k: rtn(w) for k, w in adapter.expert_weights(quantized, e).items()})
    for group in adapter.shared_experts(quantized):
        for _, linear in group:
            linear.weight.data = rtn(linear.weight.data)
    routing = adapter.route(mlp, x)
    return adapter.moe_forward(mlp, x, routing), adapter.moe_forward(quantized, x, routing)


@torch.no_grad()
def proxy_expert_sensitivities(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8,
                               group_size: int = 128, device: torch.device | str = "cpu") -> list[ModuleSensitivity]:
    """Per decoder layer and module, on the FP stream: routed expert e's ``sum_t g_{t,e}^2 |E_e^RTN2(x_t) -
    E_e(x_t)|^2`` over the tokens the FP router sends to it, the shared experts' (gated) output change, or the
    dense MLP's, each over ``sum_t |h_t|^2`` (h: the residual stream leaving the layer). One FP pass, no GPTQ."""
    import copy

    from .pipeline import _first, _kwargs_for, capture_module_input  # no cycle at import

    adapter, device, stream, layer_kwargs, rtn = _proxy_setup(model, calib_ids, batch_size, group_size, device)

    def energy(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).square().sum())

    result = []
    for layer in adapter.decoder_layers(model):
        layer.to(device)
        block = adapter.moe_block(layer)
        mlp = block if block is not None else layer.mlp
        x = capture_module_input(layer, mlp, stream, layer_kwargs, batch_size, device)
        routed, rest = [], 0.0
        if block is None:
            reference, quantized = _block_outputs(adapter, mlp, False, x, rtn)
            rest = energy(quantized, reference)
        else:
            routing = adapter.route(block, x)
            act = adapter.expert_act(block)
            for e in range(adapter.num_experts(block)):
                hit = routing.indices == e
                rows = hit.any(dim=-1).nonzero().squeeze(-1)
                g = (routing.weights * hit).sum(dim=-1)[rows].unsqueeze(-1)
                w = adapter.expert_weights(block, e)
                wq = {k: rtn(v) for k, v in w.items()}
                xe = x[rows]

                def expert(p):
                    return (act(xe @ p["gate_proj"].T) * (xe @ p["up_proj"].T)) @ p["down_proj"].T
                routed.append(energy(g * expert(wq), g * expert(w)))
            shared = adapter.shared_experts(block)
            if shared:
                quantized = copy.deepcopy(block)
                for group in adapter.shared_experts(quantized):
                    for _, linear in group:
                        linear.weight.data = rtn(linear.weight.data)
                rest = energy(adapter.shared_output(quantized, x), adapter.shared_output(block, x))
        outputs = []
        for start in range(0, stream.shape[0], batch_size):
            batch = stream[start:start + batch_size].to(device)
            outputs.append(_first(layer(batch, **_kwargs_for(layer_kwargs, batch.shape[0], device))).cpu())
        stream = torch.cat(outputs)
        norm = max(float(stream.double().square().sum()), 1e-30)
        result.append(ModuleSensitivity(tuple(r / norm for r in routed), rest / norm))
        layer.to("cpu")
    return result
