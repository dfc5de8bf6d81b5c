"""Where in a model expert-weight error hurts: the sensitivity study of arXiv 2509.07727 on our models.

    python -m eacmoe.eval --model tiny-mixtral --sensitivity --limit 4 --threads 1 --out /tmp/sens

**Frequencies.** The FP model routes the calibration windows (:func:`selection_frequencies`); every top-k slot of
every token counts once for the expert it selects.

**Targets** (:func:`plan_targets`), per MoE layer L: ``L<L>:top1`` the most often selected expert (ties: the lower
index), ``L<L>:top<k>`` the k most often selected with k the model's own top-k (the study used top-6 of 64, its
model's top-k), ``L<L>:all`` every routed expert; and ``third:first|middle|last``, every expert of the MoE layers
of that third (contiguous, non-overlapping: ``numpy.array_split`` of the MoE layers into three); with per-expert
cells on, ``L<L>:E<e>`` each expert alone; and, in a layer with shared experts (Qwen2-MoE, DeepSeek),
``L<L>:shared``, those shared experts alone (the other targets hold routed experts only). Shared experts process
every token: on tiny-qwen-moe, 2-bit GPTQ of one layer's shared expert (1/8 of the layer's routed parameters)
costs a median 0.54x the KL of all its 32 routed experts (docs/eval/tiny-qwen-moe/sensitivity/REPORT.md).

**Perturbations** (:class:`Perturbation`), applied to gate, up and down projection of every targeted expert:

- ``normal@p``: the study's model, ``w + N(0, (p x mean|w|)^2)`` per matrix (:func:`~eacmoe.codecs.gaussian_noise`).
  The noise of a cell is drawn from a generator seeded by ``crc32(cell) + seed`` (recorded as ``noise_seed``),
  so a cell's noise does not depend on which cells ran before it.
- ``sz3@p``: real SZ3 at *matched error*: SZ3's error is close to uniform on ±bound, whose standard deviation is
  bound / sqrt(3), so the absolute bound is ``sqrt(3) x p x mean|w|`` of the matrix: the same error std as
  ``normal@p``, with a hard maximum instead of Normal tails. The evaluated model uses the decompressed weights.
- ``gptq@b`` (targets ``L<L>:all``, ``L<L>:E<e>`` and ``L<L>:shared``): that layer's (expert's) matrices replaced
  by their b-bit GPTQ weights, every other weight FP. The GPTQ weights come from *one* b-bit GPTQ run over the whole
  model (``attn_bits=None``, the sweep's group size and calibration), copied into the FP model target by target; so
  a layer's GPTQ inputs (its Hessians) are those of the quantized stream of the layers before it, as in a real run.

**Measure.** Each cell is the FP model with one (target, perturbation) applied, evaluated by
:func:`eacmoe.evaluation.evaluate_model` against the FP model on the held-out windows of the primary source
(``bundled-test``; with ``--suite`` also the lm-eval suite): ``delta_ppl`` = ppl(cell) - ppl(FP), ``kl`` = mean
per-token KL(FP || cell). Cells are appended to ``<out>/results.jsonl`` (the eval sweep's results-file helpers:
resume, refusal of other weights or settings).

**Outputs** in ``<out>``: ``results.jsonl`` and ``results.csv`` (one row per cell), ``heatmap.png`` (KL, ΔPPL and,
with the suite, Δ accuracy of layer x perturbation, the thirds, and layer x expert for per-expert GPTQ), ``REPORT.md`` (tables and a paragraph, computed
from the figures, comparing with the study's findings) and ``sensitivity.json``, the file a quantizer reads:

.. code-block:: text

    {
      "schema": "eacmoe.sensitivity/1",
      "model": str, "fingerprint": str,           # weights the scores were measured on
      "settings": {...},                          # as in results.jsonl
      "metric": "kl",                             # what "score" is: mean per-token KL(FP || cell), nats
      "score_perturbation": "gptq@2",             # the perturbation behind "score" (see below)
      "layers": [                                 # one entry per decoder layer, in order
        {"layer": int,
         "moe": bool,                             # false: a dense layer, not perturbed, score null
         "score": float | null,                   # KL of the layer's experts under score_perturbation
         "selection_frequency": [float] | null,   # share of the layer's top-k slots per expert (sums to 1)
         "kl": {perturbation: float},             # target L<L>:all, every perturbation measured
         "delta_ppl": {perturbation: float},
         "delta_acc": {perturbation: float},      # suite accuracy change in points ({} without --suite)
         "experts": [{"expert": int, "score": float, "delta_ppl": float}] | null,  # per-expert gptq cells
         "shared": {"score": float, "delta_ppl": float} | null}  # the L<L>:shared gptq cell (null: none)
      ],
      "thirds": {"first"|"middle"|"last": {"layers": [int], "kl": {...}, "delta_ppl": {...}}}
    }

``score_perturbation`` is ``gptq@<bits>`` when those cells were measured, else the strongest ``normal@p``.
Higher score = more sensitive. ``score`` covers the routed experts only; a quantizer adds ``shared`` where present.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import get_adapter
from .codecs import NOISE_LEVELS, ErrorBound, compress_matrix, gaussian_noise, mean_abs
from .evaluation import (
    SweepContext,
    SweepError,
    SweepSettings,
    append_row,
    drop_cut_short_line,
    suite_module,
    check_resumable,
    evaluate_model,
    load_rows,
    report_header,
)
from .expert_shift import measure_fp_reference
from .job_checks import check_group_size_for_model
from .pipeline import LayerwiseQuantizer, ModelLayers, QuantizeConfig
from .schedule import BitsError
from .weight_scan import scan_weights
from .workflow import load_heldout, load_model

__all__ = [
    "SCHEMA", "Perturbation", "StudyCell", "StudySettings", "Target", "apply_perturbation", "build_sensitivity",
    "matched_sz3_bound", "noise_seed", "perturbed", "plan_cells", "plan_targets", "heatmap_panels", "plot_heatmap", "run_study",
    "selection_frequencies", "suite_accuracy", "write_outputs",
]

log = logging.getLogger(__name__)

SCHEMA = "eacmoe.sensitivity/1"
PRIMARY_SOURCE = "bundled-test"
RESULTS_FILE = "results.jsonl"
CSV_FILE = "results.csv"
HEATMAP_FILE = "heatmap.png"
REPORT_FILE = "REPORT.md"
SENSITIVITY_FILE = "sensitivity.json"
PER_EXPERT_LIMIT = 256  # per-expert GPTQ cells run by default when the model has at most this many routed experts
THIRDS = ("first", "middle", "last")
FP_CELL = "fp"


@dataclass(frozen=True)
class StudySettings:
    """The sweep's settings (held-out windows, calibration, group size, seed, suite) plus the study's own.
    ``per_expert`` None: per-expert GPTQ cells when the model has at most :data:`PER_EXPERT_LIMIT` experts."""

    sweep: SweepSettings = field(default_factory=SweepSettings)
    noise_levels: tuple[float, ...] = NOISE_LEVELS
    gptq_bits: int = 2
    per_expert: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({**asdict(self.sweep), "noise_levels": list(self.noise_levels),
                                      "gptq_bits": self.gptq_bits, "per_expert": self.per_expert}))


# --------------------------------------------------------------------------------------------------------------
# Frequencies and targets


@torch.no_grad()
def selection_frequencies(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> list[list[int] | None]:
    """Per decoder layer, how many top-k slots the FP model's routing gives each expert on ``input_ids``
    (None for a dense layer)."""
    adapter = get_adapter(model)
    reference = measure_fp_reference(model, input_ids, batch_size=batch_size)
    counts: list[list[int] | None] = []
    for layer, routings in zip(adapter.decoder_layers(model), reference.routing):
        if routings is None:
            counts.append(None)
            continue
        num_experts = adapter.num_experts(adapter.moe_block(layer))
        total = sum(torch.bincount(r.indices.flatten(), minlength=num_experts) for r in routings)
        counts.append([int(c) for c in total])
    return counts


@dataclass(frozen=True)
class Target:
    """A set of experts to perturb: ``experts`` maps a decoder layer to the routed experts perturbed in it,
    ``shared`` lists the decoder layers whose shared experts are perturbed."""

    name: str
    group: str                                  # top1 | topk | all | third | expert | shared
    experts: tuple[tuple[int, tuple[int, ...]], ...]
    shared: tuple[int, ...] = ()

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(layer for layer, _ in self.experts) + self.shared


def _ranked(counts: Sequence[int]) -> list[int]:
    return sorted(range(len(counts)), key=lambda e: (-counts[e], e))  # most selected first; ties: lower index


def plan_targets(counts: Sequence[Sequence[int] | None], top_k: int, per_expert: bool = False,
                 shared_layers: Sequence[int] = ()) -> list[Target]:
    """The study's targets (module docstring) from :func:`selection_frequencies`' counts; ``shared_layers``: the
    MoE layers with shared experts."""
    moe_layers = [i for i, c in enumerate(counts) if c is not None]
    targets: list[Target] = []
    for layer in moe_layers:
        ranked = _ranked(counts[layer])
        targets += [Target(f"L{layer}:top1", "top1", ((layer, (ranked[0],)),)),
                    Target(f"L{layer}:top{top_k}", "topk", ((layer, tuple(sorted(ranked[:top_k]))),)),
                    Target(f"L{layer}:all", "all", ((layer, tuple(range(len(ranked)))),))]
    for name, layers in zip(THIRDS, np.array_split(np.array(moe_layers, dtype=int), 3)):
        if len(layers):
            targets.append(Target(f"third:{name}", "third",
                                  tuple((int(i), tuple(range(len(counts[int(i)])))) for i in layers)))
    if per_expert:
        targets += [Target(f"L{layer}:E{e}", "expert", ((layer, (e,)),))
                    for layer in moe_layers for e in range(len(counts[layer]))]
    targets += [Target(f"L{layer}:shared", "shared", (), (layer,)) for layer in shared_layers]
    return targets


def shared_expert_linears(adapter, layer: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name relative to the decoder layer, Linear) of a MoE layer's shared experts; [] without any."""
    return [item for group in adapter.shared_experts(adapter.moe_block(layer)) for item in group]


# --------------------------------------------------------------------------------------------------------------
# Perturbations


@dataclass(frozen=True)
class Perturbation:
    """``kind`` normal (the study's noise model), sz3 (real SZ3 at the matched error std) or gptq (``level`` =
    bits); for normal and sz3 ``level`` is the study's p (error std = p x mean|w| of the matrix)."""

    kind: str
    level: float

    @property
    def label(self) -> str:
        return f"{self.kind}@{self.level:g}"

    @classmethod
    def parse(cls, label: str) -> "Perturbation":
        kind, _, level = label.partition("@")
        return cls(kind, float(level))


def matched_sz3_bound(w: torch.Tensor, p: float) -> float:
    """The SZ3 absolute bound whose error std matches ``normal@p``: SZ3's error is about uniform on ±bound, std
    bound / sqrt(3), so bound = sqrt(3) x p x mean|w|."""
    return math.sqrt(3.0) * float(p) * mean_abs(w.detach().to("cpu", torch.float32).numpy())


def noise_seed(cell: str, seed: int) -> int:
    """The generator seed of a cell's noise: independent of the order cells run in."""
    return (zlib.crc32(cell.encode()) + int(seed)) % 2**63


@torch.no_grad()
def apply_perturbation(model: nn.Module, target: Target, perturbation: Perturbation, *,
                       generator: torch.Generator | None = None, gptq_model: nn.Module | None = None
                       ) -> dict[str, Any]:
    """Perturb ``target``'s experts (routed and shared) of ``model`` in place; returns what was done: ``error_std``
    (the applied error's std over all perturbed weights), ``error_std_over_mean_abs`` (that std / mean |w|,
    comparable to p), ``max_error_over_bound`` (sz3 only, at most 1). ``gptq_model``: the model whose expert weights
    gptq copies."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    source_layers = None
    if perturbation.kind == "gptq":
        if gptq_model is None:
            raise ValueError("a gptq perturbation needs the quantized model to copy from")
        source_layers = adapter.decoder_layers(gptq_model)
    sq_error, sq_ratio, numel, worst = 0.0, 0.0, 0, 0.0

    def perturb(w: torch.Tensor, quantized: torch.Tensor | None) -> torch.Tensor:
        """``w`` under the perturbation (``quantized``: its GPTQ counterpart), the error statistics accumulated."""
        nonlocal sq_error, sq_ratio, numel, worst
        if perturbation.kind == "normal":
            new = gaussian_noise(w, perturbation.level, generator)
        elif perturbation.kind == "sz3":
            bound = matched_sz3_bound(w, perturbation.level)
            if bound > 0:
                new, stats = compress_matrix(w, "sz3", ErrorBound("abs", bound))
                worst = max(worst, stats.max_abs_error / bound)
            else:  # p = 0 (or an all-zero matrix): nothing to compress away
                new = w.clone()
        elif perturbation.kind == "gptq":
            new = quantized.clone()
        else:
            raise ValueError(f"unknown perturbation kind {perturbation.kind!r}")
        error = (new.double() - w.double())
        scale = mean_abs(w.detach().to("cpu", torch.float32).numpy())
        sq_error += float(error.pow(2).sum())
        sq_ratio += float(error.pow(2).sum()) / scale**2 if scale > 0 else 0.0
        numel += w.numel()
        return new

    for layer_index, experts in target.experts:
        block = adapter.moe_block(layers[layer_index])
        for e in experts:
            quantized = (adapter.expert_weights(adapter.moe_block(source_layers[layer_index]), e)
                         if source_layers is not None else {})
            new = {proj: perturb(w, quantized.get(proj)) for proj, w in adapter.expert_weights(block, e).items()}
            adapter.set_expert_weights(block, e, new)
    for layer_index in target.shared:
        for name, linear in shared_expert_linears(adapter, layers[layer_index]):
            quantized = source_layers[layer_index].get_submodule(name).weight if source_layers is not None else None
            linear.weight.data.copy_(perturb(linear.weight.data, quantized))
    done = {"error_std": math.sqrt(sq_error / max(1, numel)),
            "error_std_over_mean_abs": math.sqrt(sq_ratio / max(1, numel))}
    if perturbation.kind == "sz3":
        done["max_error_over_bound"] = worst
    return done


@contextlib.contextmanager
def perturbed(model: nn.Module, target: Target, perturbation: Perturbation, **kwargs: Any) -> Iterator[dict]:
    """:func:`apply_perturbation` for the duration of the context; the target's weights are restored after."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    saved = {(layer, e): {k: v.detach().clone() for k, v in adapter.expert_weights(adapter.moe_block(layers[layer]), e).items()}
             for layer, experts in target.experts for e in experts}
    saved_shared = [(linear, linear.weight.data.clone()) for layer in target.shared
                    for _, linear in shared_expert_linears(adapter, layers[layer])]
    try:
        yield apply_perturbation(model, target, perturbation, **kwargs)
    finally:
        for (layer, e), weights in saved.items():
            adapter.set_expert_weights(adapter.moe_block(layers[layer]), e, weights)
        for linear, weight in saved_shared:
            linear.weight.data.copy_(weight)


# --------------------------------------------------------------------------------------------------------------
# Cells


@dataclass(frozen=True)
class StudyCell:
    target: Target | None          # None: the FP model itself
    perturbation: Perturbation | None

    @property
    def label(self) -> str:
        return FP_CELL if self.target is None else f"{self.target.name}|{self.perturbation.label}"


def plan_cells(targets: Sequence[Target], noise_levels: Sequence[float], gptq_bits: int | None) -> list[StudyCell]:
    """The FP cell, then normal and sz3 at every level for the top1 / topk / all / third targets, and gptq for
    the all, expert and shared targets (``gptq_bits`` None: no gptq cells)."""
    noise = [Perturbation(kind, float(p)) for kind in ("normal", "sz3") for p in noise_levels]
    gptq = [] if gptq_bits is None else [Perturbation("gptq", gptq_bits)]
    cells = [StudyCell(None, None)]
    for target in targets:
        perturbations = {"all": noise + gptq, "expert": gptq, "shared": gptq}.get(target.group, noise)
        cells += [StudyCell(target, p) for p in perturbations]
    return cells


def _build_gptq_model(context: SweepContext, bits: int) -> nn.Module:
    """The FP model with every expert matrix at ``bits``-bit GPTQ (one run; attention and routers FP)."""
    s = context.settings
    model = copy.deepcopy(context.fp_model)
    config = QuantizeConfig(expert_bits=[bits] * context.num_layers, method="gptq", attn_bits=None,
                            group_size=s.group_size, seed=s.seed)
    LayerwiseQuantizer(model, config).run(context.calibration())
    return model


# --------------------------------------------------------------------------------------------------------------
# The study


def run_study(model_name: str, settings: StudySettings, out: Path, command: str | None = None) -> list[dict]:
    """Measure every cell of the study not yet in ``<out>/results.jsonl``, then rewrite the outputs (module
    docstring); returns all rows. Bad input raises SweepError before ``out`` is created or a cell is written."""
    out = Path(out)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise SweepError(f"{blocking} exists and is not a directory (the study writes into {out})")
    if settings.gptq_bits not in (2, 3, 4, 8):
        raise SweepError(f"gptq bits must be one of 2, 3, 4, 8, got {settings.gptq_bits}")
    if any(not 0 <= p < math.inf for p in settings.noise_levels) or not settings.noise_levels:
        raise SweepError("noise levels must be non-negative finite numbers (the study's p, e.g. 0.1 0.3 0.5 0.8)")
    results_path = out / RESULTS_FILE
    rows = load_rows(results_path)
    if settings.sweep.suite_tasks:
        suite_module()

    fp_model, tokenizer = load_model(model_name, torch.float32)
    adapter = get_adapter(fp_model)
    context_length = getattr(fp_model.config, "max_position_embeddings", None) or 2048
    sweep = settings.sweep.resolved(context_length)
    settings = StudySettings(**{**asdict(settings), "sweep": sweep})
    fingerprint = scan_weights(fp_model, ModelLayers(adapter.decoder_layers(fp_model))).fingerprint
    # per_expert only adds cells: a study run without them can be continued with them
    check_resumable(rows, model_name, fingerprint, settings.as_dict(), results_path, cell_independent=("per_expert",))
    heldout = load_heldout(tokenizer, sweep.eval_samples, sweep.eval_seqlen)[PRIMARY_SOURCE]
    try:  # e.g. tiny-qwen-moe's experts are 64 wide: fail now, not after the noise cells
        check_group_size_for_model(fp_model, sweep.group_size, attention=False)
    except BitsError as exc:
        raise SweepError(str(exc)) from None
    ctx = SweepContext(fp_model, tokenizer, sweep)

    counts = selection_frequencies(fp_model, ctx.calibration(), sweep.batch_size)
    blocks = [adapter.moe_block(layer) for layer in adapter.decoder_layers(fp_model)]
    moe_blocks = [b for b in blocks if b is not None]
    if not moe_blocks:
        raise SweepError(f"{model_name} has no MoE layer to study")
    top_k = adapter.top_k(moe_blocks[0])
    total_experts = sum(adapter.num_experts(b) for b in moe_blocks)
    per_expert = settings.per_expert if settings.per_expert is not None else total_experts <= PER_EXPERT_LIMIT
    shared_layers = [i for i, layer in enumerate(adapter.decoder_layers(fp_model))
                     if adapter.moe_block(layer) is not None and shared_expert_linears(adapter, layer)]
    cells = plan_cells(plan_targets(counts, top_k, per_expert, shared_layers), settings.noise_levels,
                       settings.gptq_bits)
    done = {r["cell"] for r in rows}
    pending = [c for c in cells if c.label not in done]

    out.mkdir(parents=True, exist_ok=True)
    drop_cut_short_line(results_path)
    if pending:
        reference = measure_fp_reference(fp_model, heldout, batch_size=sweep.batch_size)
        gptq_model = None
        if any(c.perturbation is not None and c.perturbation.kind == "gptq" for c in pending):
            log.info("quantizing every expert to %d-bit GPTQ once; each gptq cell copies its target's experts",
                     settings.gptq_bits)
            gptq_model = _build_gptq_model(ctx, settings.gptq_bits)
        work = copy.deepcopy(fp_model)
        for cell in tqdm(pending, desc="sensitivity cells", unit="cell"):
            t0 = time.perf_counter()
            row: dict[str, Any] = {"cell": cell.label, "model": model_name, "fingerprint": fingerprint,
                                   "settings": settings.as_dict(), "threads": sweep.threads}
            if cell.target is None:
                metrics = evaluate_model(ctx, work, {PRIMARY_SOURCE: heldout}, {PRIMARY_SOURCE: reference})
                row.update(target=None, group="fp", perturbation=None, selection_counts=counts)
            else:
                seed = noise_seed(cell.label, sweep.seed)
                generator = torch.Generator().manual_seed(seed)
                with perturbed(work, cell.target, cell.perturbation, generator=generator,
                               gptq_model=gptq_model) as applied:
                    metrics = evaluate_model(ctx, work, {PRIMARY_SOURCE: heldout}, {PRIMARY_SOURCE: reference})
                row.update(target=cell.target.name, group=cell.target.group,
                           experts={str(layer): list(e) for layer, e in cell.target.experts},
                           shared_layers=list(cell.target.shared),
                           perturbation=cell.perturbation.label, noise_seed=seed, applied=applied)
            row.update(metrics, seconds=time.perf_counter() - t0)
            append_row(results_path, row)
            rows.append(row)
    rows = load_rows(results_path)
    write_outputs(rows, counts, out, command)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Outputs


def suite_accuracy(row: dict) -> float | None:
    """The mean accuracy over the suite's tasks (the ``*_acc`` metrics) of a row measured with ``--suite``."""
    accs = [v for k, v in sorted(row.get("suite", {}).items()) if k.endswith("_acc")]
    return sum(accs) / len(accs) if accs else None


def _figures(rows: Sequence[dict]) -> tuple[float, dict[tuple[str, str], dict[str, float]]]:
    """FP perplexity and ``{(target, perturbation): {"ppl", "delta_ppl", "kl", "shift"}}``, plus ``"delta_acc"``
    (suite accuracy of the cell minus FP's, in points of the mean task accuracy) where the suite was run."""
    fp = next((r for r in rows if r["cell"] == FP_CELL), None)
    if fp is None:
        raise SweepError("the results hold no fp cell to measure changes against")
    fp_ppl, fp_acc = fp[PRIMARY_SOURCE]["ppl"], suite_accuracy(fp)
    figures = {}
    for r in rows:
        if r["cell"] == FP_CELL:
            continue
        m = r[PRIMARY_SOURCE]
        figures[(r["target"], r["perturbation"])] = {"ppl": m["ppl"], "delta_ppl": m["ppl"] - fp_ppl,
                                                     "kl": m["kl"], "shift": m["shift"]["any"]}
        acc = suite_accuracy(r)
        if acc is not None and fp_acc is not None:
            figures[(r["target"], r["perturbation"])]["delta_acc"] = 100 * (acc - fp_acc)
    return fp_ppl, figures


def _perturbation_order(labels: set[str]) -> list[str]:
    kinds = {"normal": 0, "sz3": 1, "gptq": 2}
    return sorted(labels, key=lambda lab: (kinds.get(Perturbation.parse(lab).kind, 3), Perturbation.parse(lab).level))


def build_sensitivity(rows: Sequence[dict], counts: Sequence[Sequence[int] | None]) -> dict[str, Any]:
    """The ``sensitivity.json`` document (schema in the module docstring) from the rows of a results file."""
    _, figures = _figures(rows)
    fp = next(r for r in rows if r["cell"] == FP_CELL)
    settings = fp["settings"]
    gptq_label = Perturbation("gptq", settings["gptq_bits"]).label
    noise_labels = _perturbation_order({p for (_, p) in figures if not p.startswith("gptq")})
    has_gptq = any(p == gptq_label for (_, p) in figures)
    score_label = gptq_label if has_gptq else max(
        (lab for lab in noise_labels if lab.startswith("normal")), key=lambda lab: Perturbation.parse(lab).level)
    layers = []
    for i, c in enumerate(counts):
        if c is None:
            layers.append({"layer": i, "moe": False, "score": None, "selection_frequency": None, "kl": {},
                           "delta_ppl": {}, "delta_acc": {}, "experts": None, "shared": None})
            continue
        mine = {p: f for (t, p), f in figures.items() if t == f"L{i}:all"}
        experts = [{"expert": e, "score": figures[(f"L{i}:E{e}", gptq_label)]["kl"],
                    "delta_ppl": figures[(f"L{i}:E{e}", gptq_label)]["delta_ppl"]}
                   for e in range(len(c)) if (f"L{i}:E{e}", gptq_label) in figures]
        shared = figures.get((f"L{i}:shared", gptq_label))
        total = sum(c)
        layers.append({"layer": i, "moe": True, "score": mine.get(score_label, {}).get("kl"),
                       "selection_frequency": [n / total if total else 0.0 for n in c],
                       "kl": {p: mine[p]["kl"] for p in _perturbation_order(set(mine))},
                       "delta_ppl": {p: mine[p]["delta_ppl"] for p in _perturbation_order(set(mine))},
                       "delta_acc": {p: mine[p]["delta_acc"] for p in _perturbation_order(set(mine))
                                     if "delta_acc" in mine[p]},
                       "experts": experts or None,
                       "shared": {"score": shared["kl"], "delta_ppl": shared["delta_ppl"]} if shared else None})
    thirds = {}
    for r in rows:
        if r.get("group") == "third" and r["target"] not in thirds:
            thirds[r["target"]] = {"layers": sorted(int(k) for k in r["experts"]), "kl": {}, "delta_ppl": {}}
    for (t, p), f in figures.items():
        if t in thirds:
            thirds[t]["kl"][p], thirds[t]["delta_ppl"][p] = f["kl"], f["delta_ppl"]
    return {"schema": SCHEMA, "model": fp["model"], "fingerprint": fp["fingerprint"], "settings": settings,
            "metric": "kl", "score_perturbation": score_label, "layers": layers,
            "thirds": {t.partition(":")[2]: v for t, v in thirds.items()}}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_csv(rows: Sequence[dict], path: Path) -> None:
    fp_ppl, figures = _figures(rows)
    header = ["cell", "target", "group", "perturbation", "noise_seed", "ppl", "delta_ppl", "kl", "shift_any",
              "error_std_over_mean_abs"]
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            if r["cell"] == FP_CELL:
                writer.writerow([FP_CELL, "", "fp", "", "", fp_ppl, 0.0, r[PRIMARY_SOURCE]["kl"], 0.0, 0.0])
                continue
            fig = figures[(r["target"], r["perturbation"])]
            writer.writerow([r["cell"], r["target"], r["group"], r["perturbation"], r.get("noise_seed", ""),
                             fig["ppl"], fig["delta_ppl"], fig["kl"], fig["shift"],
                             r.get("applied", {}).get("error_std_over_mean_abs", "")])
    os.replace(tmp, path)


def _third_comparison(doc: dict) -> str:
    """The paragraph comparing this model's thirds with the study's findings, from the figures alone."""
    thirds = doc["thirds"]
    if len(thirds) < 3:
        return "The model has fewer than three MoE layers; the thirds cannot be compared with the study's."
    labels = _perturbation_order(set.intersection(*(set(v["kl"]) for v in thirds.values())))
    if not labels:
        return "No perturbation of the thirds has been measured yet."
    winners = [max(THIRDS, key=lambda t: thirds[t]["kl"][lab]) for lab in labels]
    most = max(THIRDS, key=winners.count)
    strongest = max((lab for lab in labels if lab.startswith("normal")), default=labels[-1],
                    key=lambda lab: Perturbation.parse(lab).level)
    kl = {t: thirds[t]["kl"][strongest] for t in THIRDS}
    yes = {True: "is", False: "is not"}
    middle_most = kl["middle"] >= max(kl.values())
    parts = [
        f"On this model the **{most} third** is the most sensitive under {winners.count(most)} of {len(labels)} "
        f"perturbations of whole thirds (KL ×1e3 at {strongest}: first {1e3 * kl['first']:.3f}, middle "
        f"{1e3 * kl['middle']:.3f}, last {1e3 * kl['last']:.3f}; the thirds hold "
        f"{' / '.join(str(len(thirds[t]['layers'])) for t in THIRDS)} MoE layers).",
        "The study (Moonlight, GSM8K accuracy, Normal noise) found shallow layers tolerant, middle layers most "
        f"sensitive and deep layers robust; here, at {strongest}, the middle third {yes[middle_most]} "
        f"the most sensitive, the first third {yes[kl['first'] < kl['middle']]} more tolerant than the middle, and "
        f"the last third {yes[kl['last'] < kl['middle']]} more robust than the middle.",
    ]
    improved = [(lab, t) for t in THIRDS for lab, d in thirds[t]["delta_ppl"].items() if d < 0]
    parts.append(f"{len(improved)} perturbation(s) of a whole third lowered perplexity below FP"
                 + (" (" + ", ".join(f"{t} {lab}" for lab, t in improved[:4]) + ")" if improved else "")
                 + "; the study saw deep-layer noise sometimes raise accuracy.")
    ratios = [thirds[t]["kl"][f"sz3@{Perturbation.parse(lab).level:g}"] / thirds[t]["kl"][lab]
              for t in THIRDS for lab in labels if lab.startswith("normal") and thirds[t]["kl"][lab] > 0
              and f"sz3@{Perturbation.parse(lab).level:g}" in thirds[t]["kl"]]
    if ratios:
        parts.append(f"At matched error std, real SZ3 costs {float(np.median(ratios)):.2f}× the KL of the Normal "
                     "model (median over thirds and levels; SZ3's error is bounded and close to uniform, the "
                     "Normal's has tails).")
    scored = [layer for layer in doc["layers"] if layer["score"] is not None]
    if scored:
        hi, lo = max(scored, key=lambda x: x["score"]), min(scored, key=lambda x: x["score"])
        parts.append(f"Under {doc['score_perturbation']} of one layer's experts alone, layer {hi['layer']} is the "
                     f"most sensitive (KL ×1e3 {1e3 * hi['score']:.3f}) and layer {lo['layer']} the least "
                     f"({1e3 * lo['score']:.3f}).")
    shared_ratios = [layer["shared"]["score"] / layer["score"] for layer in scored
                     if layer.get("shared") and layer["score"] > 0]
    if shared_ratios:
        parts.append(f"A layer's shared experts alone cost a median {float(np.median(shared_ratios)):.2f}× the KL of "
                     f"all its routed experts under {doc['score_perturbation']} ({len(shared_ratios)} layers).")
    return " ".join(parts)


def write_outputs(rows: Sequence[dict], counts: Sequence[Sequence[int] | None], out: Path,
                  command: str | None = None) -> dict[str, Any]:
    """results.csv, sensitivity.json, heatmap.png and REPORT.md from the rows; returns the sensitivity document."""
    out = Path(out)
    doc = build_sensitivity(rows, counts)
    _write_atomic(out / SENSITIVITY_FILE, json.dumps(doc, indent=1) + "\n")
    _write_csv(rows, out / CSV_FILE)
    plot_heatmap(rows, out / HEATMAP_FILE)
    fp_ppl, figures = _figures(rows)
    s = doc["settings"]
    labels = _perturbation_order({p for (_, p) in figures})
    lines = report_header("Sensitivity of expert weights to error, layer by layer (arXiv 2509.07727's design)",
                          command)
    lines += [
        f"Model {doc['model']} (weights fingerprint {doc['fingerprint']}), torch threads {s.get('threads')}. "
        f"Expert selection frequencies from {s['nsamples']} calibration windows of {s['seqlen']} tokens; every cell "
        f"measured on {s['eval_samples']} held-out windows of {s['eval_seqlen']} tokens ({PRIMARY_SOURCE}). FP "
        f"perplexity {fp_ppl:.3f}. Noise seeds: crc32(cell) + {s['seed']}, recorded per cell in `{RESULTS_FILE}`.",
        "",
        "Perturbations of the targeted experts' gate, up and down matrices: `normal@p` adds N(0, (p·mean|w|)²) per "
        "matrix (the study's model); `sz3@p` is real SZ3 at matched error std (absolute bound √3·p·mean|w|, since "
        "SZ3's error is about uniform on ±bound); `gptq@b` copies the target's experts from one b-bit GPTQ run of "
        f"the whole model (group size {s['group_size']}) into the FP model. Targets: `top1` the layer's most often "
        "selected expert, `topk` its top-k (k = the model's top-k), `all` every expert of the layer, `third:*` every "
        "expert of the first / middle / last third of the MoE layers; `shared` the layer's shared experts alone "
        "(every other target holds routed experts only).", "",
        "## Comparison with the study", "", _third_comparison(doc), "",
        f"![heatmaps of KL, ΔPPL and suite accuracy]({HEATMAP_FILE})", "",
        "## KL(FP‖cell) ×1e3, layer by layer", ""]
    groups = [g for g in ("top1", "topk", "all") if any(r.get("group") == g for r in rows)]
    header = ["target", *labels]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    targets = list(dict.fromkeys(r["target"] for r in rows if r.get("group") in (*groups, "third", "shared")))
    for t in targets:
        lines.append("| " + " | ".join([t, *[f"{1e3 * figures[(t, lab)]['kl']:.3f}" if (t, lab) in figures else "–"
                                              for lab in labels]]) + " |")
    lines += ["", "## ΔPPL against FP", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in targets:
        lines.append("| " + " | ".join([t, *[f"{figures[(t, lab)]['delta_ppl']:+.4f}" if (t, lab) in figures
                                              else "–" for lab in labels]]) + " |")
    if any("delta_acc" in f for f in figures.values()):
        fp_row = next(r for r in rows if r["cell"] == FP_CELL)
        errs = [v for k, v in sorted(fp_row["suite"].items()) if k.endswith("_acc_stderr")]
        stderr = 100 * math.sqrt(sum(e * e for e in errs)) / len(errs) if errs else float("nan")
        lines += ["", "## Suite accuracy change against FP (points)", "",
                  f"Mean accuracy over the suite tasks ({', '.join(s['suite_tasks'])}; "
                  f"{s['suite_limit'] or 'all'} items per task); FP {100 * suite_accuracy(fp_row):.2f}%, standard "
                  f"error of that mean about {stderr:.2f} points, so smaller changes are noise.", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for t in targets:
            lines.append("| " + " | ".join([t, *[f"{figures[(t, lab)]['delta_acc']:+.2f}"
                                                  if "delta_acc" in figures.get((t, lab), {}) else "–"
                                                  for lab in labels]]) + " |")
    lines += ["", f"Per-layer and per-expert scores for the quantizer: `{SENSITIVITY_FILE}` (schema in "
              "eacmoe/sensitivity.py). Raw rows: `results.jsonl`, `results.csv`.", ""]
    _write_atomic(out / REPORT_FILE, "\n".join(lines))
    return doc


HEATMAP_METRICS = {  # figure key -> (colour-bar label, worse is larger)
    "kl": ("KL(FP‖cell), nats per token (log)", True),
    "delta_ppl": ("ΔPPL against FP", True),
    "delta_acc": ("Δ suite accuracy, points", False),
}


def heatmap_panels(rows: Sequence[dict], metric: str = "kl") -> list[tuple[str, np.ndarray, list[str], list[str]]]:
    """``(title, grid, column labels, row labels)`` of ``metric`` (a key of :data:`HEATMAP_METRICS`): layer x
    perturbation for each target group, thirds x perturbation, and layer x expert for per-expert cells; NaN where
    a cell was not measured."""
    _, figures = _figures(rows)

    def value(key: tuple) -> float:
        return figures.get(key, {}).get(metric, np.nan)

    layer_rows = [r for r in rows if r.get("group") in ("top1", "topk", "all")]
    layers = sorted({int(next(iter(r["experts"]))) for r in layer_rows})
    columns = [(g, p) for g in ("top1", "topk", "all")
               for p in _perturbation_order({r["perturbation"] for r in layer_rows if r["group"] == g})]
    name_of = {(int(next(iter(r["experts"]))), r["group"]): r["target"] for r in layer_rows}
    grid = np.array([[value((name_of.get((layer, g)), p)) for g, p in columns] for layer in layers])
    thirds = [f"third:{t}" for t in THIRDS if any(r.get("target") == f"third:{t}" for r in rows)]
    third_cols = _perturbation_order({p for (t, p) in figures if t in thirds})
    third_grid = np.array([[value((t, p)) for p in third_cols] for t in thirds])
    panels = [("layer x perturbation", grid.reshape(len(layers), len(columns)), [f"{g} {p}" for g, p in columns],
               [f"L{x}" for x in layers]),
              ("thirds x perturbation", third_grid.reshape(len(thirds), len(third_cols)), third_cols,
               [t.partition(":")[2] for t in thirds])]
    expert_rows = [r for r in rows if r.get("group") == "expert"]
    if expert_rows:
        n_exp = 1 + max(int(next(iter(r["experts"].values()))[0]) for r in expert_rows)
        egrid = np.full((len(layers), n_exp), np.nan)
        for r in expert_rows:
            layer, (e,) = next(iter(r["experts"].items()))
            egrid[layers.index(int(layer)), e] = value((r["target"], r["perturbation"]))
        panels.append((f"layer x expert ({expert_rows[0]['perturbation']} of one expert)", egrid,
                       [str(e) for e in range(n_exp)], [f"L{x}" for x in layers]))
    return panels


def plot_heatmap(rows: Sequence[dict], path: Path) -> None:
    """One row of heatmaps per metric measured (KL, log colour; ΔPPL; Δ suite accuracy when the suite ran), each
    row: layer x perturbation, the thirds, and layer x expert for per-expert GPTQ. Diverging colours are centred
    on 0 with red for worse than FP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    _, figures = _figures(rows)
    metrics = [m for m in HEATMAP_METRICS if any(m in f for f in figures.values())]
    rows_of_panels = [heatmap_panels(rows, m) for m in metrics]
    panels0 = rows_of_panels[0]
    n_layers = panels0[0][1].shape[0]
    widths = [max(3, 0.45 * max(1, p[1].shape[1])) for p in panels0]
    fig, axes = plt.subplots(len(metrics), len(panels0),
                             figsize=(sum(widths) + 2, len(metrics) * (0.45 * max(4, n_layers) + 2.5)),
                             gridspec_kw={"width_ratios": widths, "hspace": 0.7}, squeeze=False)
    for metric, panels, ax_row in zip(metrics, rows_of_panels, axes):
        label, larger_is_worse = HEATMAP_METRICS[metric]
        values = np.concatenate([p[1][np.isfinite(p[1])].ravel() for p in panels if p[1].size])
        if metric == "kl":
            positive = values[values > 0]
            norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max())) if positive.size else None
            cmap = "magma_r"
        else:
            span = float(np.abs(values).max()) if values.size and np.abs(values).max() > 0 else 1.0
            norm, cmap = TwoSlopeNorm(0.0, -span, span), "RdBu_r" if larger_is_worse else "RdBu"
        image = None
        for ax, (title, data, xlabels, ylabels) in zip(ax_row, panels):
            if data.size == 0:
                ax.set_axis_off()
                continue
            shown = np.where(np.isfinite(data) & (data > 0), data, np.nan) if metric == "kl" else data
            image = ax.imshow(shown, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
            ax.set_xticks(range(len(xlabels)), xlabels, rotation=90, fontsize=7)
            ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
            ax.set_title(f"{title}: {metric}", fontsize=9)
        if image is not None:
            fig.colorbar(image, ax=ax_row.tolist(), label=label, shrink=0.8)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
