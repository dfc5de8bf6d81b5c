"""The eval stage: quantization (RTN, GPTQ, QESC, QESC+PESF) against error-bounded codecs (SZ3, ZFP) at matched bits.

A sweep is a list of **cells**, each a (method, bits target) pair such as ``fp``, ``rtn@2``, ``qesc+pesf@2.5`` or
``sz3@bpw:2`` / ``zfp@rel:0.3``. Every cell builds its compressed model in memory from the same FP model (loaded in
float32) and is measured against it on the held-out windows (:mod:`eacmoe.heldout`): perplexity, per-token
KL(FP || cell), the expert-shift rates (:mod:`eacmoe.expert_shift`) and, optionally, the lm-eval suite of eval/.

What is compared (the "expert matrices"): the matrices the quantizer puts at the *expert* bits, i.e. every
routed expert's gate / up / down projection, shared experts and the MLPs of dense layers. Attention, routers,
norms, embeddings and the head stay FP in every cell (quantizers run with ``attn_bits=None``), so the cells differ
only in how the experts are stored.

One accounting of bits for all methods (:class:`~eacmoe.codecs.WeightBits` summed over the expert matrices):

- quantized methods: the tensors of the packed export (:func:`~eacmoe.codecs.packed_bits`: int32 codes, fp16
  scales, packed zeros, int32 g_idx); an ideal order-0 entropy coder's figure is recorded beside it;
- codecs: the real compressed bytes, the codec's stream plus the container header
  (:attr:`~eacmoe.codecs.Compressed.bits`); the evaluated model uses the decompressed float32 weights, so
  every |w - w'| stays within the bound;
- fp: the checkpoint's own dtype (16 bits for a bf16 checkpoint).

"Bits moved per weight" is what crosses PCIe when an offloaded expert is fetched: zstd frames of the packed
tensors for quantized methods (:func:`~eacmoe.codecs.zstd_bits`), the codec's bytes for codecs.

Methods live in :data:`METHODS` (adding one touches that dict). Finished cells are appended to
``<out>/results.jsonl`` one JSON line each, with the model's weights fingerprint and the settings, so an
interrupted sweep resumes without recomputing them; a results file from other weights or settings is refused.
``<out>/REPORT.md`` and ``<out>/pareto.png`` are rewritten from it after every sweep.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import get_adapter
from .calibration import get_calibration_data
from .codec_study import codec_bounds, report_lines, run_codec_study
from .codecs import (
    BoundSearch,
    ErrorBound,
    WeightBits,
    compress_matrix,
    get_codec,
    parse_bound,
    quantized_bits_moved,
    search_bound,
)
from .expert_shift import FPReference, measure_expert_shift, measure_fp_reference
from .job_checks import check_group_size_for_model
from .lazy_loading import as_torch_dtype
from .pesf import PESFConfig, enable_pesf
from .pipeline import LayerwiseQuantizer, ModelLayers, QuantizeConfig
from .schedule import BitsError, parse_expert_bits
from .weight_scan import scan_weights
from .workflow import load_config, load_heldout, load_model

__all__ = [
    "DEFAULT_BITS", "DEFAULT_METHODS", "METHODS", "BuiltModel", "Cell", "Method", "SweepContext", "SweepError",
    "SweepSettings", "evaluate_model", "expert_matrices", "load_rows", "plan_cells", "report_header", "run_sweep",
    "write_report",
]

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("fp", "rtn", "gptq", "qesc", "qesc+pesf", "sz3", "zfp")
DEFAULT_BITS = ("2", "2.5", "3", "4")
DEFAULT_PESF_ALPHA = 0.3  # docs/pesf: the largest alpha whose perplexity cost stays small on both bundled models
RESULTS_FILE = "results.jsonl"
REPORT_FILE = "REPORT.md"
PARETO_FILE = "pareto.png"
EVAL_DIR = Path(__file__).resolve().parent.parent / "eval"  # the lm-eval suite (a checkout's eval/ folder)


class SweepError(ValueError):
    """A bad input to a sweep (method, bits, output directory, results file); the message is one line."""


# --------------------------------------------------------------------------------------------------------------
# Settings and cells


@dataclass(frozen=True)
class SweepSettings:
    """Everything besides the weights that decides a cell's figures; a results file is resumed only with equal
    settings. ``suite_tasks`` empty: no lm-eval suite; ``suite_limit`` None: all items."""

    eval_samples: int = 32
    eval_seqlen: int | None = None     # None: the model's context, at most 512
    nsamples: int = 128
    seqlen: int | None = None          # None: the model's context, at most 2048
    group_size: int = 128
    seed: int = 0
    pesf_alpha: float = DEFAULT_PESF_ALPHA
    suite_tasks: tuple[str, ...] = ()
    suite_limit: int | None = None
    suite_batch_size: int = 16
    batch_size: int = 8
    threads: int | None = None

    def resolved(self, context: int) -> "SweepSettings":
        """With the sequence lengths chosen from the model's context when not given."""
        return SweepSettings(**{**asdict(self), "eval_seqlen": self.eval_seqlen or min(512, context),
                                "seqlen": self.seqlen or min(2048, context)})

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # as a results line stores it: tuples become lists


@dataclass(frozen=True)
class Cell:
    """One (method, target) of a sweep. ``target``: an expert bit schedule (``"2"``, ``"2.5"``) for quantized
    methods, an :class:`~eacmoe.codecs.ErrorBound` string (``"bpw:2"``, ``"rel:0.3"``) for codecs, None for fp."""

    method: str
    target: str | None = None

    @property
    def label(self) -> str:
        return self.method if self.target is None else f"{self.method}@{self.target}"


@dataclass
class BuiltModel:
    """A cell's model and its bits over the expert matrices (``bits``: stored; ``bits_moved``: on the wire)."""

    model: nn.Module
    bits: WeightBits
    bits_moved: WeightBits
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered method: ``kind`` is "fp", "quantized" (target = bit schedule) or "codec" (target = bound);
    ``build(context, target)`` returns the cell's model, built from ``context.fp_model`` without changing it.
    ``base``: the method whose model of the same target this one starts from (its cell is run right after)."""

    kind: str
    build: Callable[["SweepContext", str | None], BuiltModel]
    base: str | None = None


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def plan_cells(methods: Sequence[str], bits: Sequence[str]) -> list[Cell]:
    """The cells of ``methods`` x ``bits``, checked before any weight is read (bad input: SweepError).

    A plain number is a target for every method (a quantized method's bit schedule: 2, 2.5, 3, 4, 8; a codec's
    ``bpw:<number>``); a bound (``rel:0.3``, ``abs:1e-3``, ``bpw:2.2``) is a codec target only, which quantized
    methods skip; fp has one cell whatever the bits.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SweepError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if not methods:
        raise SweepError("--methods needs at least one method")
    needs_bits = any(METHODS[m].kind != "fp" for m in methods)
    if needs_bits and not bits:
        raise SweepError("--bits needs at least one target")
    cells: list[Cell] = []
    for method in dict.fromkeys(methods):
        kind = METHODS[method].kind
        if kind == "fp":
            cells.append(Cell(method))
            continue
        for b in dict.fromkeys(str(x).strip() for x in bits):
            if kind == "codec":
                try:
                    bound = parse_bound(f"bpw:{b}" if _is_number(b) else b)
                except ValueError as exc:
                    raise SweepError(f"--bits {b!r}: {exc}") from None
                cells.append(Cell(method, str(bound)))
            elif _is_number(b):
                try:
                    parse_expert_bits(b, 2)  # the syntax; the layer count does not matter for a single width
                except ValueError as exc:
                    raise SweepError(f"--bits {b!r} for {method}: {exc}") from None
                cells.append(Cell(method, b))
            elif ":" not in b:
                raise SweepError(f"--bits {b!r}: expected a number of bits or a codec bound such as rel:0.3")
    return _after_bases(cells)


def _after_bases(cells: list[Cell]) -> list[Cell]:
    """Each cell of a method with a ``base`` right after its base's cell of the same target (when planned), so the
    base's model is still at hand (:meth:`SweepContext.built` keeps the last one)."""
    labels = {c.label for c in cells}
    follows = {}
    for c in cells:
        base = METHODS[c.method].base
        if base is not None and Cell(base, c.target).label in labels:
            follows.setdefault(Cell(base, c.target).label, []).append(c)
    moved = {c.label for group in follows.values() for c in group}
    ordered = []
    for c in cells:
        if c.label not in moved:
            ordered += [c, *follows.get(c.label, [])]
    return ordered


# --------------------------------------------------------------------------------------------------------------
# The expert matrices


def expert_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: weight}`` of every matrix the quantizer puts at the expert bits (routed experts, shared experts,
    dense-layer MLPs), named as :class:`~eacmoe.pipeline.LayerwiseQuantizer` names them. The tensors are views of
    the model's storage ([out, in], detached): writing into one changes the model."""
    adapter = get_adapter(model)
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(adapter.decoder_layers(model)):
        block = adapter.moe_block(layer)
        groups = adapter.dense_mlp_linears(layer) if block is None else adapter.shared_experts(block)
        out.update({f"layers.{i}.{name}": linear.weight.data for group in groups for name, linear in group})
        if block is not None:
            for e in range(adapter.num_experts(block)):
                out.update({f"layers.{i}.mlp.experts.{e}.{proj}": w.detach()
                            for proj, w in adapter.expert_weights(block, e).items()})
    return out


# --------------------------------------------------------------------------------------------------------------
# The context a sweep builds its cells in


class SweepContext:
    """The FP model, its tokenizer and settings, plus what several cells share (calibration tokens, searched codec
    bounds, the last quantized model, which QESC+PESF reuses)."""

    def __init__(self, fp_model: nn.Module, tokenizer, settings: SweepSettings,
                 storage_dtype: torch.dtype = torch.bfloat16):
        self.fp_model = fp_model
        self.storage_dtype = storage_dtype  # the checkpoint's dtype: what the fp cell's weights take
        self.tokenizer = tokenizer
        self.settings = settings
        self.num_layers = len(get_adapter(fp_model).decoder_layers(fp_model))
        self._calibration: torch.Tensor | None = None
        self._searches: dict[tuple[str, str], BoundSearch] = {}
        self._last_built: tuple[Cell, BuiltModel] | None = None

    def calibration(self) -> torch.Tensor:
        if self._calibration is None:
            s = self.settings
            self._calibration = get_calibration_data("bundled", self.tokenizer, s.nsamples, s.seqlen, seed=s.seed)
        return self._calibration

    def bound_search(self, codec: str, bound: ErrorBound) -> BoundSearch:
        """The bound giving ``bound.value`` bits per weight over all expert matrices (searched once per sweep;
        raises :class:`~eacmoe.codecs.UnreachableBits`)."""
        key = (codec, str(bound))
        if key not in self._searches:
            mats = [w.detach().to("cpu", torch.float32).numpy() for w in expert_matrices(self.fp_model).values()]
            self._searches[key] = search_bound(get_codec(codec), mats, bound.value)
        return self._searches[key]

    def built(self, cell: Cell) -> BuiltModel:
        """The model of ``cell``, reusing the last one built when it is the same cell (do not modify it)."""
        if self._last_built is None or self._last_built[0] != cell:
            # the previous model is freed only after the build: QESC+PESF builds on the QESC model before it
            self._last_built = (cell, METHODS[cell.method].build(self, cell.target))
        return self._last_built[1]


# --------------------------------------------------------------------------------------------------------------
# Methods


def _sum_bits(parts: Sequence[WeightBits]) -> WeightBits:
    total = WeightBits(0, 0.0)
    for part in parts:
        total = total + part
    return total


def _build_fp(context: SweepContext, _target: str | None) -> BuiltModel:
    bits = 8 * context.storage_dtype.itemsize  # as the checkpoint stores them
    numel = sum(w.numel() for w in expert_matrices(context.fp_model).values())
    stored = WeightBits(numel, float(numel * bits))
    return BuiltModel(context.fp_model, stored, stored, {"dtype_bits": bits})


def _quantizer_method(method: str) -> Callable[[SweepContext, str | None], BuiltModel]:
    def build(context: SweepContext, target: str | None) -> BuiltModel:
        s = context.settings
        model = copy.deepcopy(context.fp_model)
        config = QuantizeConfig(expert_bits=parse_expert_bits(str(target), context.num_layers), method=method,
                                attn_bits=None, group_size=s.group_size, seed=s.seed)
        calib = (context.calibration() if method != "rtn"
                 else torch.empty(0, s.seqlen, dtype=torch.long))  # RTN reads no data
        quantizer = LayerwiseQuantizer(model, config)
        quantizer.run(calib)
        names = expert_matrices(model)
        missing = [n for n in names if n not in quantizer.quantized]
        if missing or len(quantizer.quantized) != len(names):
            raise RuntimeError(f"the quantizer's matrices differ from the expert matrices (e.g. {missing[:1]})")
        moved = [quantized_bits_moved(quantizer.quantized[n]) for n in names]
        return BuiltModel(model, _sum_bits([m["packed"] for m in moved]), _sum_bits([m["zstd"] for m in moved]),
                          {"expert_bits": config.expert_bits,
                           "bits_entropy": _sum_bits([m["entropy"] for m in moved]).as_dict()})
    return build


def _build_qesc_pesf(context: SweepContext, target: str | None) -> BuiltModel:
    qesc = context.built(Cell("qesc", target))
    model = copy.deepcopy(qesc.model)
    enable_pesf(model, PESFConfig(alpha=context.settings.pesf_alpha))
    return BuiltModel(model, qesc.bits, qesc.bits_moved, {**qesc.details, "pesf_alpha": context.settings.pesf_alpha})


def _codec_method(codec: str) -> Callable[[SweepContext, str | None], BuiltModel]:
    def build(context: SweepContext, target: str | None) -> BuiltModel:
        bound = parse_bound(str(target))
        model = copy.deepcopy(context.fp_model)
        matrices = expert_matrices(model)
        if bound.kind == "bpw":  # one relative scale for all matrices, found on the FP weights
            search = context.bound_search(codec, bound)
            bounds = [ErrorBound("abs", b) for b in search.abs_bounds]
            details = {"searched_bound": str(search.bound)}
        else:
            bounds, details = [bound] * len(matrices), {}
        parts, worst = [], 0.0
        with torch.no_grad():
            for w, b in zip(matrices.values(), bounds):
                restored, stats = compress_matrix(w, codec, b)
                w.copy_(restored)
                parts.append(stats.bits)
                worst = max(worst, stats.max_abs_error / stats.abs_bound)
        bits = _sum_bits(parts)
        return BuiltModel(model, bits, bits, {**details, "max_error_over_bound": worst})
    return build


METHODS: dict[str, Method] = {
    "fp": Method("fp", _build_fp),
    "rtn": Method("quantized", _quantizer_method("rtn")),
    "gptq": Method("quantized", _quantizer_method("gptq")),
    "qesc": Method("quantized", _quantizer_method("qesc")),
    "qesc+pesf": Method("quantized", _build_qesc_pesf, base="qesc"),
    "sz3": Method("codec", _codec_method("sz3")),
    "zfp": Method("codec", _codec_method("zfp")),
}


# --------------------------------------------------------------------------------------------------------------
# Measuring a cell


def suite_module():
    if not (EVAL_DIR / "run_suite.py").exists():
        raise SweepError(f"--suite needs the lm-eval suite of an eacmoe checkout ({EVAL_DIR} not found)")
    if str(EVAL_DIR) not in sys.path:
        sys.path.insert(0, str(EVAL_DIR))
    import run_suite  # noqa: PLC0415 - eval/ is not a package

    return run_suite


def evaluate_model(context: SweepContext, model: nn.Module, heldout: dict[str, torch.Tensor],
                   references: dict[str, FPReference]) -> dict[str, Any]:
    """Held-out figures of ``model`` against the FP model per source, and the suite when the settings ask."""
    s = context.settings
    row: dict[str, Any] = {}
    for source, ids in heldout.items():
        rep = measure_expert_shift(context.fp_model, model, ids, batch_size=s.batch_size,
                                   reference=references[source])
        row[source] = {"ppl": rep.perplexity["q/q"], "kl": rep.kl_from_fp["q/q"],
                       "oracle_ppl": rep.perplexity["q/fp"], "shift": rep.mean_shift(),
                       "shift_per_layer": [layer["any"] for layer in rep.shift], "tokens": rep.tokens}
    if s.suite_tasks:
        run_suite = suite_module()
        row["suite"] = run_suite.summarize(run_suite.evaluate_model_object(
            model, context.tokenizer, list(s.suite_tasks), limit=s.suite_limit, batch_size=s.suite_batch_size))
    stats = getattr(model, "pesf_stats", None)
    if stats:  # how much prefill work PESF removed during the measurement
        slots = sum(st.slots for st in stats.values())
        row["pesf_skipped_slots"] = sum(st.skipped_slots for st in stats.values()) / max(1, slots)
    return row


# --------------------------------------------------------------------------------------------------------------
# Results file


def load_rows(path: Path) -> list[dict]:
    """The finished cells of a results file (later lines win). A truncated last line (a write cut short) is
    dropped; any other unreadable line is a SweepError."""
    if not path.exists():
        return []
    if not path.is_file():
        raise SweepError(f"{path} is not a file")
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row["cell"]
        except (json.JSONDecodeError, TypeError, KeyError):
            if number == len(lines):
                log.warning("%s: dropping its last line, cut short by an interrupted write", path)
                continue
            raise SweepError(f"{path} line {number} is not a results line; move the file aside or pass "
                             "another --out") from None
        rows.append(row)
    return list({r["cell"]: r for r in rows}.values())


def check_resumable(rows: list[dict], model: str, fingerprint: str, settings: dict, path: Path,
                    cell_independent: tuple[str, ...] = ()) -> None:
    """Refuse to add cells to a results file measured on other weights or with other settings
    (``cell_independent``: settings that only choose which cells run, not what a cell measures)."""
    for row in rows:
        if row.get("fingerprint") != fingerprint:
            raise SweepError(f"{path} holds cells measured on other weights (fingerprint {row.get('fingerprint')}, "
                             f"{model} is {fingerprint}); pass another --out or move the file aside")
        stored = row.get("settings") or {}
        changed = sorted(k for k in {**settings, **stored}
                         if stored.get(k) != settings.get(k) and k not in cell_independent)
        if changed:
            raise SweepError(f"{path} holds cells measured with other settings ({', '.join(changed)}); pass the "
                             "same flags, another --out, or move the file aside")


def append_row(path: Path, row: dict) -> None:
    with path.open("a") as f:  # one write per line: a crash leaves whole lines and at most one cut-short last line
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def drop_cut_short_line(path: Path) -> None:
    """Rewrite ``path`` without a last line cut short by an interrupted write (load_rows skipped it), so that the
    lines appended next stay readable."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    try:
        if lines:
            json.loads(lines[-1])
        if not lines or lines[-1].endswith("\n"):
            return
    except json.JSONDecodeError:
        lines = lines[:-1]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# The sweep


def run_sweep(model_name: str, cells: Sequence[Cell], settings: SweepSettings, out: Path,
              command: str | None = None, codec_workers: int | None = None) -> list[dict]:
    """Measure every cell of ``cells`` not yet in ``<out>/results.jsonl``, then rewrite the report; returns all rows.

    The report also carries the codec study (:mod:`eacmoe.codec_study`: throughput at every codec cell's bound with
    1 and ``codec_workers`` workers, default every available core, and SZ3's error histogram), measured once.

    Bad input (the output path, the results file, a model that cannot be loaded, held-out windows, a bits target a
    codec cannot reach) raises before ``out`` is created or a cell is written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} exists and is not a directory")
    results_path = out / RESULTS_FILE
    rows = load_rows(results_path)
    if settings.suite_tasks:
        suite_module()

    fp_model, tokenizer = load_model(model_name, torch.float32)  # fp32: the codecs' bounds hold exactly
    context = getattr(fp_model.config, "max_position_embeddings", None) or 2048
    settings = settings.resolved(context)
    fingerprint = scan_weights(fp_model, ModelLayers(get_adapter(fp_model).decoder_layers(fp_model))).fingerprint
    check_resumable(rows, model_name, fingerprint, settings.as_dict(), results_path)
    done = {r["cell"] for r in rows}
    pending = [c for c in cells if c.label not in done]
    heldout = load_heldout(tokenizer, settings.eval_samples, settings.eval_seqlen)
    if any(METHODS[c.method].kind == "quantized" for c in pending):
        try:  # e.g. tiny-qwen-moe's experts are 64 wide: fail now, not in the middle of a sweep
            check_group_size_for_model(fp_model, settings.group_size, attention=False)
        except BitsError as exc:
            raise SweepError(str(exc)) from None
    ctx = SweepContext(fp_model, tokenizer, settings, as_torch_dtype(None, load_config(model_name)))
    for cell in pending:  # unreachable codec targets fail here, before anything is written
        if METHODS[cell.method].kind == "codec" and parse_bound(str(cell.target)).kind == "bpw":
            ctx.bound_search(cell.method, parse_bound(str(cell.target)))

    out.mkdir(parents=True, exist_ok=True)
    drop_cut_short_line(results_path)
    if pending:
        references = {source: measure_fp_reference(fp_model, ids, batch_size=settings.batch_size)
                      for source, ids in heldout.items()}
        for cell in tqdm(pending, desc="cells", unit="cell"):
            t0 = time.perf_counter()
            built = ctx.built(cell)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            metrics = evaluate_model(ctx, built.model, heldout, references)
            row = {"cell": cell.label, "method": cell.method, "target": cell.target, "model": model_name,
                   "fingerprint": fingerprint, "settings": settings.as_dict(), "threads": settings.threads,
                   "bits": built.bits.as_dict(), "bits_moved": built.bits_moved.as_dict(), **built.details,
                   **metrics, "seconds": {"build": build_s, "evaluate": time.perf_counter() - t0}}
            append_row(results_path, row)
            log.info("%s: %.3f bits per weight, test ppl %.3f", cell.label, built.bits.bits_per_weight,
                     metrics.get("bundled-test", {}).get("ppl", float("nan")))
            rows.append(row)
    rows = load_rows(results_path)
    bounds = codec_bounds(rows, [name for name, m in METHODS.items() if m.kind == "codec"])
    study = None
    if bounds:
        matrices = {n: w.detach().to("cpu", torch.float32).numpy() for n, w in expert_matrices(fp_model).items()}
        study = run_codec_study(matrices, bounds, out, fingerprint, codec_workers)
    write_report(rows, out, command, study)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Report


def _family(row: dict) -> str:
    return row["method"]


def _get(row: dict, *keys: str) -> float | None:
    value: Any = row
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) else None


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _sort_key(row: dict) -> tuple:
    order = list(METHODS)
    return (order.index(row["method"]) if row["method"] in order else len(order), row["bits"]["bits_per_weight"])


def report_header(title: str, command: str | None) -> list[str]:
    """A report's first lines: its title and, when known, the command that produced it."""
    return [f"# {title}", "", *(["Produced by:", "", f"    {command}", ""] if command else [])]


def _suite_note(rows: list[dict], settings: dict) -> str:
    """A sentence on the suite columns: tasks, items and the FP cell's standard errors (what a difference means)."""
    if not settings.get("suite_tasks"):
        return ""
    fp = next((r for r in rows if r["method"] == "fp" and "suite" in r), None)
    errs = "" if fp is None else ", standard error at FP " + ", ".join(
        f"{k.removesuffix('_acc_stderr')} {100 * v:.1f}" for k, v in sorted(fp["suite"].items())
        if k.endswith("_acc_stderr")) + " points"
    return (f" Suite columns: lm-eval accuracy on the tasks {', '.join(settings['suite_tasks'])} of eval/ "
            f"({settings.get('suite_limit') or 'all'} items per task{errs}).")


def write_report(rows: list[dict], out: Path, command: str | None = None,
                 codec_study: dict | None = None) -> None:
    """``REPORT.md`` (one table row per cell, then the codec study when given) and ``pareto.png`` from the rows of a
    results file."""
    if not rows:
        return
    rows = sorted(rows, key=_sort_key)
    has_wt2 = any("wikitext2" in r for r in rows)
    suite_keys = sorted({k for r in rows for k in r.get("suite", {}) if k.endswith("_acc")})
    settings = rows[0]["settings"] if rows else {}
    header = ["cell", "bits/weight", "bits moved/weight", "test ppl", *(["WT2 ppl"] if has_wt2 else []),
              "KL(FP‖q) ×1e3", "shift any %", "shift half %", "shift all %", *[f"{k} %" for k in suite_keys]]
    lines = report_header("Quantization against error-bounded codecs at matched bits", command)
    lines += [
        f"Model {rows[0]['model']} (weights fingerprint {rows[0]['fingerprint']}), torch threads "
        f"{settings.get('threads')}. Held-out: {settings.get('eval_samples')} windows of {settings.get('eval_seqlen')} "
        "tokens of the bundled test split" + (" and of WikiText-2 test" if has_wt2 else "") + "." if rows else "",
        "",
        "Only the expert matrices differ between cells (routed experts, shared experts, dense-layer MLPs); attention, "
        "routers, norms, embeddings and head stay FP, and every cell is evaluated in float32. **bits/weight** is one "
        "accounting over the expert matrices: for RTN / GPTQ / QESC the packed export's tensors (int32 codes, fp16 "
        f"scales, packed zeros, int32 g_idx; group size {settings.get('group_size')}), for SZ3 / ZFP the real "
        "compressed bytes including the codec's stream header and eacmoe's container header, for fp the checkpoint's "
        "dtype. **bits moved/weight**: zstd frames of the packed tensors (quantized), the codec's bytes (codecs). "
        "Codec targets `bpw:b` use one bound relative to each matrix's mean |w|, searched over all expert matrices "
        "to land within 2% of b; `2.5` for quantized methods is the mixed schedule (first half of the layers 3-bit, "
        f"second half 2-bit). QESC+PESF is the QESC model with prefill expert skipping (alpha "
        f"{settings.get('pesf_alpha')}); its shift rates are QESC's (PESF acts after the router). KL and shift "
        "against the FP model on the bundled test split; shift = share of tokens whose top-k expert set changed "
        "(any / at least half / all of the k), mean over MoE layers." + _suite_note(rows, settings), "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        test = r.get("bundled-test", {})
        cells = [r["cell"], _fmt(r["bits"]["bits_per_weight"], 3), _fmt(r["bits_moved"]["bits_per_weight"], 3),
                 _fmt(_get(r, "bundled-test", "ppl"), 3), *([_fmt(_get(r, "wikitext2", "ppl"), 2)] if has_wt2 else []),
                 _fmt(None if "kl" not in test else 1e3 * test["kl"], 3),
                 *[_fmt(None if "shift" not in test else 100 * test["shift"][k], 2) for k in ("any", "half", "all")],
                 *[_fmt(None if k not in r.get("suite", {}) else 100 * r["suite"][k], 1) for k in suite_keys]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![quality against bits per weight]({PARETO_FILE})", "",
              f"Raw figures, one JSON line per cell: `{RESULTS_FILE}`.", ""]
    if codec_study:
        lines += report_lines(codec_study)
    tmp = out / f".{REPORT_FILE}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / REPORT_FILE)
    plot_pareto(rows, out / PARETO_FILE)


MARKERS = {"fp": "*", "rtn": "v", "gptq": "s", "qesc": "o", "qesc+pesf": "P", "sz3": "^", "zfp": "D"}


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def plot_pareto(rows: list[dict], path: Path) -> None:
    """Test perplexity and KL against bits per weight, one marker per method family, the FP level as a dashed
    line and the Pareto front (fewest bits for the quality) as a grey step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("test perplexity", lambda r: _get(r, "bundled-test", "ppl")),
              ("KL(FP‖q) ×1e3", lambda r: None if _get(r, "bundled-test", "kl") is None
               else 1e3 * _get(r, "bundled-test", "kl")))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (title, get) in zip(axes, panels):
        points = []
        for family in dict.fromkeys(_family(r) for r in rows):
            xs, ys = [], []
            for r in rows:
                y = get(r)
                if _family(r) != family or y is None:
                    continue
                if r["method"] == "fp":
                    if y <= 0:  # KL of fp to itself: nothing to draw on a log axis
                        continue
                    ax.axhline(y, color="black", linestyle="--", linewidth=0.8,
                               label=f"fp ({r['bits']['bits_per_weight']:.0f} bits)")
                    continue
                xs.append(r["bits"]["bits_per_weight"])
                ys.append(y)
            if xs:
                ax.scatter(xs, ys, marker=MARKERS.get(family, "x"), s=40, label=family)
                points += list(zip(xs, ys))
        front = _pareto_front(points)
        if len(front) > 1:
            ax.step(*zip(*front), where="post", color="grey", linewidth=0.8, zorder=0)
        ax.set_xlabel("bits per weight (expert matrices)")
        ax.set_ylabel(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
