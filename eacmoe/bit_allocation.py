"""`--bits auto:B`: per-layer expert bits from {2, 3, 4} chosen by a knapsack under an average-bits budget.

**Budget.** B is the average bits over the weights the per-layer expert width governs: routed experts, shared
experts and dense MLPs of every decoder layer (attention has its own `--attn-bits`). Each layer's count is its real
parameter count (`layer_expert_params`), so layers of different size cost what they weigh, and the allocation
satisfies ``sum_l params_l * bits_l <= B * sum_l params_l`` exactly (integer arithmetic, B read as a decimal
fraction). With equal layers, `auto:2.5` gives half of them 3 bits, as the paper's 2.5 does, but chooses which.

**Objective.** Minimise the predicted sum of per-layer losses. A layer's loss at 2 bits is its *sensitivity*;
from 2 bits on it shrinks ``ERROR_SHRINK_PER_BIT`` = 4x per extra bit (one bit halves the quantization step, so
the squared error falls about 4x): ``loss_l(b) = s_l * 4^-(b - 2)``. Sensitivities come from

- a sensitivity file (`--sensitivity FILE`, ``sensitivity.json`` of ``python -m eacmoe.eval --sensitivity``): each
  layer's ``score``, the KL to FP of the model with only that layer's experts GPTQ-quantized at 2 bits
  (``score_perturbation`` must be ``gptq@2``); a dense layer (no score) gets the median score of the others; or
- when no file is given, a proxy computed in the run (`proxy_sensitivities`): one FP pass over the calibration
  tokens, and per layer the energy of the block output's change when its experts are RTN-quantized at 2 bits,
  relative to the energy of the residual stream leaving the layer. Measured against the files: docs/QUANTIZING.md.

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


@dataclass
class Allocation:
    """An `auto:B` schedule and where it came from (recorded in report.json)."""
    spec: str
    bits: list[int]
    budget: float
    achieved_average: float      # sum params * bits / sum params, over the expert weights
    params: list[int]
    sensitivities: list[float]
    source: str                  # the sensitivity file, or "proxy: ..."
    rule: str = f"loss(b) = s * {ERROR_SHRINK_PER_BIT:g}^-(b-2), bits in {AUTO_CHOICES}"

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def schedule(self) -> str:
        """The comma list `--bits` and `python -m eacmoe.plan --bits` accept for the same schedule."""
        return ",".join(map(str, self.bits))


def read_sensitivity_file(path: Path, num_layers: int, fingerprint: str | None = None) -> list[float]:
    """Per-layer 2-bit sensitivities from a sensitivity.json; AllocationError when it does not fit the model."""
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
    scores = [layer.get("score") for layer in layers]
    known = [float(s) for s in scores if s is not None]
    if not known:
        raise AllocationError(f"--sensitivity {path} holds no layer scores")
    fill = statistics.median(known)
    return [fill if s is None else max(0.0, float(s)) for s in scores]


def allocation_from_sensitivities(spec: str, params: Sequence[int], sensitivities: Sequence[float],
                                  source: str) -> Allocation:
    budget = parse_auto_budget(spec)
    bits = allocate_bits(params, [predicted_losses(s) for s in sensitivities], budget)
    achieved = sum(p * b for p, b in zip(params, bits)) / sum(params)
    return Allocation(spec=spec, bits=bits, budget=float(budget), achieved_average=achieved, params=list(params),
                      sensitivities=list(sensitivities), source=source)


def auto_expert_bits(spec: str, model: nn.Module, sensitivity: Path | None = None,
                     calib_ids: torch.Tensor | None = None, fingerprint: str | None = None,
                     batch_size: int = 8, group_size: int = 128) -> Allocation:
    """The `auto:B` schedule of `model` from a sensitivity file, or (no file) from the in-run proxy on `calib_ids`."""
    params = layer_expert_params(model)
    if sensitivity is not None:
        scores = read_sensitivity_file(sensitivity, len(params), fingerprint)
        return allocation_from_sensitivities(spec, params, scores, str(sensitivity))
    if calib_ids is None:
        raise AllocationError("--bits auto:B without --sensitivity needs calibration tokens for its proxy")
    scores = proxy_sensitivities(model, calib_ids, batch_size=batch_size, group_size=group_size)
    return allocation_from_sensitivities(spec, params, scores, f"proxy: {PROXY_DESCRIPTION}")


PROXY_DESCRIPTION = "RTN 2-bit block-output error energy / energy of the layer's output, FP stream"


@torch.no_grad()
def proxy_sensitivities(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8,
                        group_size: int = 128, device: torch.device | str = "cpu") -> list[float]:
    """Per decoder layer: sum_t |block_RTN2(x_t) - block(x_t)|^2 / sum_t |h_t|^2 on the FP stream (h: the residual
    stream leaving the layer, x: the block input), the routed experts (and shared experts / dense MLP) round-to-
    nearest at 2 bits, routing unchanged. Cheap: one FP pass, no GPTQ."""
    from .pipeline import _first, _kwargs_for, capture_layer_inputs, capture_module_input  # no cycle at import
    from .quant import QuantSpec, rtn_quantize

    adapter = get_adapter(model)
    device = torch.device(device)
    stream, layer_kwargs = capture_layer_inputs(model, adapter, calib_ids, batch_size, device)
    spec = QuantSpec(bits=2, group_size=group_size)

    def rtn(w: torch.Tensor) -> torch.Tensor:
        return rtn_quantize(w, spec).dequantize().to(w.dtype)

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
