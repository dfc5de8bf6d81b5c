"""Scaling law of `python -m eacmoe.quantize`: CPU time and peak RSS of one synthetic MoE decoder layer against the
number of experts E, the hidden size H, the expert intermediate size I and the calibration tokens N; a cost model
with physical terms fitted to them; projections to full Mixtral-8x7B and Qwen3-30B-A3B.

    python scripts/scaling_law.py --threads 1 --json docs/scaling/scaling.json \\
        --write docs/SCALING.md --plot docs/scaling/scaling.png

(the rerun command written at the top of docs/SCALING.md).

MEASURED: every point is one `python -m eacmoe.quantize` run (methods gptq and qesc; 2-bit experts, 4-bit attention,
group 128, float32, CPU, --lazy, --threads) on a one-layer synthetic random Mixtral-style MoE (8 heads, 2 KV heads,
top-2; scripts/measure_memory.py builds it), in a child process: its CPU time (user + sys) and peak RSS come from the
kernel (`os.wait4`), the per-stage seconds of the layer (LayerReport.seconds: attention, router, experts, advance)
from the run's report.json. Each sweep moves one factor while the others stay at the base point. A run of the same
command on a tiny layer (H = I = 128, same E and N) is the baseline: the fit only sees differences to it, so the
start-up (Python, torch, transformers, tokenizer, calibration text) is never fitted as compute.

FITTED: each stage's seconds are sum_j c_j x phi_j, where phi_j counts one kind of work of that stage from the layer's
shapes as the pipeline does it (multiply-adds of forwards and Hessians, c^3 per factorised Hessian, rows x c^2 of the
GPTQ block updates, columns and matrices for the per-call Python dispatch, the router's steps); the c_j are shared by
all stages (one Hessian costs the same in attention and in an expert), fitted by non-negative least squares on
relative errors. The whole run's CPU time adds the unstaged capture forwards (same coefficients) and one fitted
per-parameter term (loading, weight scan, evaluation, packing, saving). Points named in --holdout are left out of the
fit and predicted from it.

PROJECTED: the same counts at full Mixtral-8x7B / Qwen3-30B-A3B shapes (eacmoe/assets/configs) and 128 x 2048 tokens:
time on this CPU with the fitted coefficients; on a 24 GB and an 80 GB GPU with the stated assumptions
(GPU_ASSUMPTIONS: flop terms at a fraction of the card's peak, dispatch terms at a per-launch cost); memory from
eacmoe/quant_memory.py. Nothing projected is measured.

This process never imports torch while it measures (a parent's peak RSS is inherited by its children's ru_maxrss);
--measurements FILE re-fits and re-writes from the points of an earlier --json without measuring again.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import re
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eacmoe.cli import OneLineErrorParser, positive_int, print_error, setup_logging  # noqa: E402
from eacmoe.threads import add_threads_argument, command_line, set_threads  # noqa: E402  (no torch)

log = logging.getLogger("scaling_law")


def _module_from_file(name: str, path: Path):
    """Import one file by path (a package's __init__ would import torch)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# the solver's own loop planning (eacmoe/quant/column_loops.py is torch-free)
_column_loops = _module_from_file("eacmoe_column_loops", REPO / "eacmoe" / "quant" / "column_loops.py")
LOOP_ROWS = _column_loops.GPTQ_LOOP_ROWS

STAGES = ("attention", "router", "experts", "advance")
BATCH_SIZE = 8                 # pipeline.QuantizeConfig.batch_size: sequences per forward batch
ROUTER_MAX_TOKENS = 32768      # router_calibration.RouterCalibrationConfig.max_tokens
STATISTICS_BUDGET = 256 * 2**20  # router_calibration.STATISTICS_BUDGET_BYTES
ATTENTION_HESSIAN_PER_LINEAR = False  # pipeline.collect_hessians: one GPTQ (Hessian, factorisation) per group
GPTQ_BLOCK = 128               # QuantSpec.block_size: the in-block rank-1 updates touch rows x block/2 per column
SYNTHETIC_HEADS, SYNTHETIC_KV_HEADS, SYNTHETIC_TOPK = 8, 2, 2  # scripts/measure_memory.py's MixtralConfig

# term -> (what it counts, flops per unit, GPU kind). Kinds: "fwd" forwards in the compute dtype (bf16 on a GPU),
# "fp32" GPTQ arithmetic (always fp32), "factor" Cholesky/inverse (fp32, less efficient), "fp64" the router's
# statistics, "dispatch" per-call Python/launch overhead (launches per unit), "host" work that stays on the CPU.
TERMS: dict[str, tuple[str, float, str]] = {
    "matmul": ("tokens x rows x cols multiply-adds of forward projections", 2.0, "fwd"),
    "attention_scores": ("tokens x seqlen x heads x head_dim (QK^T and PV)", 4.0, "fwd"),
    "hessian": ("tokens x cols^2 per GPTQ Hessian (X^T X, fp32)", 2.0, "fp32"),
    "factorisation": ("cols^3 per factorised Hessian (Cholesky, inverse, Cholesky)", 2.0, "factor"),
    "column_update": ("rows x cols^2 per GPTQ matrix (lazy block updates)", 1.0, "fp32"),
    "column_inner": ("rows x cols per GPTQ matrix (in-block rank-1 updates, block/2 each)", float(GPTQ_BLOCK), "fp32"),
    "per_column": ("columns of every GPTQ matrix (one Python step each)", 12.0, "dispatch"),
    "per_matrix": ("quantized matrices (solver set-up, grids, codes)", 60.0, "dispatch"),
    "expert_calls": ("expert forwards in MoE blocks (experts x batches per pass)", 8.0, "dispatch"),
    "router_statistics": ("fp64 multiply-adds of the router's sufficient statistics and steps", 2.0, "fp64"),
    "router_tokens": ("steps x tokens x hidden x experts of the router's token objective", 4.0, "fp32"),
    "params": ("layer parameters (load, weight scan, evaluation, packing, save)", 0.0, "host"),
}
STAGE_TERMS = [t for t in TERMS if t != "params"]

# The stated GPU assumptions (vendor datasheet peaks, dense, no sparsity; fractions are assumptions, not measured).
GPU_ASSUMPTIONS = {
    "RTX 3090 (24 GB)": {"memory_bytes": 24 * 2**30, "peak_flops": {"fwd": 71e12, "fp32": 35.6e12, "factor": 35.6e12,
                                                                   "fp64": 0.56e12}},
    "A100 80GB": {"memory_bytes": 80 * 2**30, "peak_flops": {"fwd": 312e12, "fp32": 19.5e12, "factor": 19.5e12,
                                                            "fp64": 9.7e12}},
}
GPU_EFFICIENCY = {"fwd": 0.4, "fp32": 0.4, "factor": 0.1, "fp64": 0.4}  # fraction of peak reached
GPU_LAUNCH_SECONDS = 8e-6      # per kernel launch / eager torch call on a GPU
GPU_RESERVED_BYTES = 2**30     # CUDA context and allocator slack, not in the formula
FULL_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b")
RERUN = ("python scripts/scaling_law.py --threads 1 --json docs/scaling/scaling.json "
         "--write docs/SCALING.md --plot docs/scaling/scaling.png")


# -- the shapes and the work they imply --------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCase:
    """One decoder layer and one quantization run of it: what the cost model counts."""
    hidden: int
    intermediate: int
    experts: int
    topk: int
    nsamples: int
    seqlen: int
    heads: int
    kv_heads: int
    head_dim: int
    method: str = "gptq"
    router_steps: int = 50
    calibration_topk: int | None = None
    hessian_tokens: int | None = None   # sum over GPTQ'd experts of the tokens in their Hessians (pooled: N)
    gptq_experts: int | None = None     # experts quantized with GPTQ (the others RTN); None: all

    @property
    def tokens(self) -> int:
        return self.nsamples * self.seqlen

    @property
    def attention(self) -> list[tuple[int, int]]:
        """[rows, cols] of q, k, v, o."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(q, self.hidden), (kv, self.hidden), (kv, self.hidden), (self.hidden, q)]

    @property
    def layer_params(self) -> int:
        h, i, e = self.hidden, self.intermediate, self.experts
        return sum(r * c for r, c in self.attention) + e * h + 3 * e * i * h + 2 * h

    def expected_hessian_tokens(self) -> int:
        """Uniform routing: each expert gets k N / E tokens; below its input width it is pooled (N tokens)."""
        share = self.tokens * self.topk / self.experts
        return int(self.experts * (self.tokens if share < self.hidden else share))


def synthetic_case(hidden: int, intermediate: int, experts: int, nsamples: int, seqlen: int, **kw) -> LayerCase:
    """A layer of scripts/measure_memory.py's synthetic Mixtral-style MoE."""
    return LayerCase(hidden=hidden, intermediate=intermediate, experts=experts, topk=SYNTHETIC_TOPK, nsamples=nsamples,
                     seqlen=seqlen, heads=SYNTHETIC_HEADS, kv_heads=SYNTHETIC_KV_HEADS,
                     head_dim=hidden // SYNTHETIC_HEADS, **kw)


def config_case(config: dict, nsamples: int, seqlen: int, **kw) -> LayerCase:
    """A layer of a bundled config (eacmoe/assets/configs/*.json, read as JSON: no transformers needed)."""
    heads = config["num_attention_heads"]
    return LayerCase(hidden=config["hidden_size"],
                     intermediate=config.get("moe_intermediate_size") or config["intermediate_size"],
                     experts=config.get("num_local_experts") or config["num_experts"],
                     topk=config["num_experts_per_tok"], nsamples=nsamples, seqlen=seqlen, heads=heads,
                     kv_heads=config.get("num_key_value_heads", heads),
                     head_dim=config.get("head_dim") or config["hidden_size"] // heads, **kw)


def _gptq(matrices: list[tuple[int, int]], hessians: list[int], tokens: int) -> dict[str, float]:
    """GPTQ of `matrices` ([rows, cols]) whose distinct Hessians have widths `hessians`, each from `tokens` rows."""
    return {"hessian": tokens * sum(c * c for c in hessians), "factorisation": sum(c ** 3 for c in hessians),
            "column_update": sum(r * c * c for r, c in matrices), "column_inner": sum(r * c for r, c in matrices),
            "per_column": sum(c for _, c in matrices), "per_matrix": len(matrices)}


def column_steps(matrices: Sequence[tuple[object, int, int]]) -> int:
    """Python column steps of GPTQ on these matrices: the columns of every loop `column_loops` makes."""
    loops = _column_loops.column_loops([(solver, (rows, cols)) for solver, rows, cols in matrices], LOOP_ROWS)
    return sum(matrices[loop[0]][2] for loop in loops)


def expert_column_steps(h: int, i: int, gptq_experts: int) -> int:
    """Column steps of a layer's routed experts: pipeline._quantize_routed_experts takes them in batches of
    max(1, loop rows // min(2I, H)); per batch, every expert's gate and up (one solver), then every down."""
    per_batch = max(1, LOOP_ROWS // min(2 * i, h))
    steps = 0
    for start in range(0, gptq_experts, per_batch):
        experts = [object() for _ in range(min(per_batch, gptq_experts - start))]
        steps += column_steps([(x, i, h) for x in experts for _ in range(2)])
        steps += column_steps([(object(), h, i) for _ in experts])
    return steps


def _add(into: dict[str, float], more: dict[str, float], times: float = 1.0) -> dict[str, float]:
    for k, v in more.items():
        into[k] = into.get(k, 0.0) + times * v
    return into


def calibration_topk(experts: int, topk: int) -> int:
    """adapters.base.calibration_topk_rule (copied: that module imports torch; a test keeps them equal)."""
    return min(experts, max(2 * topk, min(experts // 2, 20)))


def router_work(case: LayerCase) -> dict[str, float]:
    """router_calibration.calibrate_router: the statistics objective when it fits its budget, else the tokens."""
    n, h, e = min(case.tokens, ROUTER_MAX_TOKENS), case.hidden, case.experts
    k = case.calibration_topk or calibration_topk(e, case.topk)
    work = {"matmul": n * h * e}  # the FP router's target logits
    if 2 * e * h * h * 8 <= max(STATISTICS_BUDGET, n * h * 4):
        work["router_statistics"] = n * k * h * h + case.router_steps * 2 * e * h * h
    else:
        work["router_tokens"] = case.router_steps * n * h * e
    return work


def stage_work(case: LayerCase) -> dict[str, dict[str, float]]:
    """Units of every term per stage of pipeline.LayerwiseQuantizer.quantize_layer, plus "capture" (the block
    input of the quantized stream, between the attention and router timers) and "other" (the per-parameter work
    outside the layer loop's stages)."""
    n, h, i, e = case.tokens, case.hidden, case.intermediate, case.experts
    attn = case.attention
    qkv = sum(r * c for r, c in attn[:3])
    o = attn[3][0] * attn[3][1]
    scores = n * case.seqlen * case.heads * case.head_dim
    attention_forward = {"matmul": n * (qkv + o), "attention_scores": scores}
    batches = math.ceil(case.nsamples / BATCH_SIZE)
    qesc = case.method in ("qesc", "qesc-mse")

    hessians = [c for _, c in attn] if ATTENTION_HESSIAN_PER_LINEAR else [attn[0][1], attn[3][1]]
    attention = _add({"matmul": n * (2 * qkv + o), "attention_scores": scores}, _gptq(attn, hessians, n))
    qkv_solver = object()  # q, k and v share one solver (collect_hessians); o is quantized after them, alone
    attention["per_column"] = column_steps([(qkv_solver, r, c) for r, c in attn[:3]]) + attn[3][1]

    router: dict[str, float] = {}
    if qesc:
        _add(router, attention_forward)  # the FP stream's block input
        _add(router, router_work(case))

    g = case.experts if case.gptq_experts is None else case.gptq_experts
    t = case.expected_hessian_tokens() if case.hessian_tokens is None else case.hessian_tokens
    experts = {"matmul": n * h * e + t * 2 * i * h,  # routing; the down projection's input from gate and up
               "hessian": t * (h * h + i * i), "factorisation": g * (h ** 3 + i ** 3),
               "column_update": g * (2 * i * h * h + h * i * i), "column_inner": g * 3 * i * h,
               "per_column": expert_column_steps(h, i, g), "per_matrix": 3 * e}

    # the advance runs only the block on the captured block input (attention is not recomputed)
    one_pass = {"matmul": n * h * e + case.topk * n * 3 * i * h, "expert_calls": e * batches}
    advance = _add({}, one_pass, 2.0 if qesc else 1.0)
    return {"attention": attention, "router": router, "experts": experts, "advance": advance,
            "capture": dict(attention_forward), "other": {"params": case.layer_params}}


def term_vector(work: dict[str, float], terms: Sequence[str]) -> np.ndarray:
    return np.array([float(work.get(t, 0.0)) for t in terms])


# -- the fit -----------------------------------------------------------------------------------------------------
def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0, with the columns scaled to unit size (the terms span 15 decades)."""
    from scipy.optimize import nnls as scipy_nnls

    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    x, _ = scipy_nnls(a / scale, b, maxiter=50 * a.shape[1])
    return x / scale


@dataclass
class Point:
    """One measured run (or, in tests, a synthetic one)."""
    label: str                      # e.g. "H=1024"
    sweep: str                      # E, H, I, N, base or baseline
    case: LayerCase
    cpu_seconds: float
    peak_rss_bytes: int
    stage_seconds: dict[str, float]
    wall_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    command: str = ""

    def to_dict(self) -> dict:
        return {**asdict(self), "case": asdict(self.case)}

    @staticmethod
    def from_dict(d: dict) -> Point:
        return Point(**{**d, "case": LayerCase(**d["case"])})


@dataclass
class Fit:
    coefficients: dict[str, float]   # seconds per unit of each term
    fitted_labels: list[str]         # (method, label) of the points in the fit, as "method label"
    held_out: list[str]

    def stage_seconds(self, case: LayerCase) -> dict[str, float]:
        work = stage_work(case)
        return {s: float(term_vector(work[s], STAGE_TERMS) @ self._stage_c) for s in (*STAGES, "capture")}

    def total_seconds(self, case: LayerCase) -> float:
        """The whole run's compute seconds (stages, capture and the per-parameter term), start-up excluded."""
        return sum(self.stage_seconds(case).values()) + self.coefficients["params"] * case.layer_params

    @property
    def _stage_c(self) -> np.ndarray:
        return np.array([self.coefficients[t] for t in STAGE_TERMS])


def _key(p: Point) -> str:
    return f"{p.case.method} {p.label}"


def fit_cost_model(points: list[Point], baselines: dict[str, Point], held_out: Sequence[str] = (),
                   floor_seconds: float = 0.2) -> Fit:
    """Fit the coefficients: the stage terms on every (point, stage) of the points not held out, the per-parameter
    term on the rest of their CPU time; all as differences to the baseline of the same method, errors relative
    to the measured seconds (at least `floor_seconds`)."""
    train = [p for p in points if p.label not in held_out]
    rows, targets = [], []
    for p in train:
        base = baselines[p.case.method]
        work, base_work = stage_work(p.case), stage_work(base.case)
        for s in STAGES:
            weight = 1.0 / max(p.stage_seconds.get(s, 0.0), floor_seconds)
            rows.append(weight * (term_vector(work[s], STAGE_TERMS) - term_vector(base_work[s], STAGE_TERMS)))
            targets.append(weight * (p.stage_seconds.get(s, 0.0) - base.stage_seconds.get(s, 0.0)))
    c = nnls(np.array(rows), np.array(targets))
    fit = Fit(coefficients={**dict(zip(STAGE_TERMS, map(float, c))), "params": 0.0},
              fitted_labels=[_key(p) for p in train], held_out=list(held_out))
    # the rest of the CPU time: what the stages (and the capture forwards) do not explain, per layer parameter
    a, b = [], []
    for p in train:
        base = baselines[p.case.method]
        explained = fit.total_seconds(p.case) - fit.total_seconds(base.case)
        weight = 1.0 / max(p.cpu_seconds - base.cpu_seconds, floor_seconds)
        a.append([weight * (p.case.layer_params - base.case.layer_params)])
        b.append(weight * (p.cpu_seconds - base.cpu_seconds - explained))
    fit.coefficients["params"] = float(nnls(np.array(a), np.array(b))[0])
    return fit


def fit_table(points: list[Point], baselines: dict[str, Point], fit: Fit) -> list[dict]:
    """Per point: measured and fitted compute seconds (CPU time minus the baseline's), per stage too."""
    rows = []
    for p in points:
        base = baselines[p.case.method]
        fitted = fit.total_seconds(p.case) - fit.total_seconds(base.case)
        measured = p.cpu_seconds - base.cpu_seconds
        fs, fb = fit.stage_seconds(p.case), fit.stage_seconds(base.case)
        stages = {s: {"measured": p.stage_seconds.get(s, 0.0) - base.stage_seconds.get(s, 0.0),
                      "fitted": fs[s] - fb[s]} for s in STAGES}
        rows.append({"method": p.case.method, "label": p.label, "sweep": p.sweep, "held_out": p.label in fit.held_out,
                     "measured_seconds": measured, "fitted_seconds": fitted,
                     "ratio": measured / fitted if fitted > 0 else float("nan"), "stages": stages})
    return rows


# -- projection --------------------------------------------------------------------------------------------------
def gpu_seconds(case: LayerCase, gpu: dict, host_seconds_per_param: float) -> dict[str, float]:
    """One layer on a GPU under GPU_ASSUMPTIONS: flop terms at GPU_EFFICIENCY x peak, dispatch terms at
    GPU_LAUNCH_SECONDS per launch, the per-parameter work at this CPU's fitted rate (it stays on the host)."""
    total = {"flops": 0.0, "dispatch": 0.0, "host": 0.0}
    for part, work in stage_work(case).items():
        for term, units in work.items():
            _, per_unit, kind = TERMS[term]
            if kind == "dispatch":
                total["dispatch"] += units * per_unit * GPU_LAUNCH_SECONDS
            elif kind == "host":
                total["host"] += units * host_seconds_per_param
            else:
                total["flops"] += units * per_unit / (GPU_EFFICIENCY[kind] * gpu["peak_flops"][kind])
    return total


def project(fit: Fit, family: str, config: dict, nsamples: int, seqlen: int, method: str, router_steps: int,
            memory: dict | None = None) -> dict:
    """PROJECTED time (this CPU with the fitted coefficients; each GPU of GPU_ASSUMPTIONS) of the full model:
    num_hidden_layers x one layer at `nsamples` x `seqlen` tokens. `memory`: quant_memory's device and host
    peaks (bytes), when computed."""
    layers = config["num_hidden_layers"]
    case = config_case(config, nsamples, seqlen, method=method, router_steps=router_steps)
    cpu_stages = fit.stage_seconds(case)
    cpu_layer = sum(cpu_stages.values()) + fit.coefficients["params"] * case.layer_params
    out = {"family": family, "method": method, "layers": layers, "tokens": case.tokens, "router_steps": router_steps,
           "cpu": {"threads": 1, "layer_seconds": cpu_layer, "model_seconds": layers * cpu_layer,
                   "stage_seconds_per_layer": cpu_stages}, "gpus": {}}
    for name, gpu in GPU_ASSUMPTIONS.items():
        parts = gpu_seconds(case, gpu, fit.coefficients["params"])
        layer = sum(parts.values())
        entry = {"layer_seconds": layer, "model_seconds": layers * layer, "parts_per_layer": parts}
        if memory is not None:
            entry["device_peak_bytes"] = memory["device_peak"]
            entry["fits"] = memory["device_peak"] + GPU_RESERVED_BYTES <= gpu["memory_bytes"]
        out["gpus"][name] = entry
    if memory is not None:
        out["memory"] = memory
    return out


def load_bundled_config(family: str) -> dict:
    path = REPO / "eacmoe" / "assets" / "configs" / f"{family}.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def formula_memory(case: LayerCase, config: dict | None, dtype_bytes: int, base: int, lambdas: dict) -> dict:
    """eacmoe/quant_memory.py's peak for this layer (imports torch: call it after measuring). `config`: a bundled
    config dict; None: the synthetic Mixtral-style layer of `case`."""
    from transformers import AutoConfig, MixtralConfig

    from eacmoe.quant_memory import layer_peak, layer_shapes

    if config is None:
        cfg = MixtralConfig(vocab_size=8192, hidden_size=case.hidden, intermediate_size=case.intermediate,
                            num_hidden_layers=1, num_attention_heads=case.heads, num_key_value_heads=case.kv_heads,
                            num_local_experts=case.experts, num_experts_per_tok=case.topk)
    else:
        fields = dict(config)
        cfg = type(AutoConfig.for_model(fields.pop("model_type")))(**fields)
    m = layer_peak(layer_shapes(cfg), case.tokens, dtype_bytes, case.method, base=base,
                   lambda_load=lambdas["lambda_load"], lambda_save=lambdas["lambda_save"])
    return {"host_peak": m.peak, "host_peak_phase": m.peak_phase, "device_peak": max(m.device_phases.values()),
            "device_peak_phase": max(m.device_phases, key=m.device_phases.get)}


def slice_check(fit: Fit, records: list[dict]) -> list[dict]:
    """The fitted model against the real-shape slice runs of docs/memory/*.json (quantize loop seconds)."""
    rows = []
    for r in records:
        cfg = load_bundled_config(r["family"])
        inputs = r["prediction"]["inputs"]
        command = r["command"]
        # scripts/measure_real_shape_memory.py's defaults unless the recorded command sets them
        sizes = {flag: int(m.group(1)) if (m := re.search(rf"{flag}\s+(\d+)", command)) else default
                 for flag, default in (("--nsamples", 16), ("--seqlen", 512))}
        nsamples, seqlen = sizes["--nsamples"], sizes["--seqlen"]
        assert nsamples * seqlen == inputs["tokens"], (r["family"], inputs["tokens"])
        case = config_case(cfg, nsamples, seqlen, method=inputs["method"], router_steps=50,
                           gptq_experts=0 if not inputs["gptq_experts"] else None,
                           hessian_tokens=0 if not inputs["gptq_experts"] else None)
        layers = r["layers"]
        predicted = layers * (sum(fit.stage_seconds(case).values()) + fit.coefficients["params"] * case.layer_params)
        rows.append({"family": r["family"], "layers": layers, "dtype": "bfloat16" if inputs["dtype_bytes"] == 2
                     else "float32", "tokens": inputs["tokens"], "method": inputs["method"],
                     "experts_gptq": bool(inputs["gptq_experts"]), "measured_loop_seconds": r["measured"]["loop_seconds"],
                     "predicted_seconds": predicted, "ratio": r["measured"]["loop_seconds"] / predicted,
                     "command": command})
    return rows


# -- measuring ---------------------------------------------------------------------------------------------------
def _measure_memory_module():
    return _module_from_file("measure_memory", REPO / "scripts" / "measure_memory.py")


# The child: `python -m eacmoe.quantize` with time.perf_counter read as time.process_time, so that the stage seconds
# of report.json (LayerReport.seconds, timings_seconds) are this process's CPU seconds, not wall seconds that other
# jobs on a shared machine would inflate (one torch thread: CPU seconds = compute seconds).
CPU_CLOCK_CHILD = """
import runpy, sys, time
time.perf_counter = time.process_time
sys.argv = ["eacmoe.quantize", *sys.argv[1:]]
runpy.run_module("eacmoe.quantize", run_name="__main__", alter_sys=True)
"""


def quantize_command(checkpoint: Path, out: Path, case: LayerCase, threads: int) -> list[str]:
    """`python -m eacmoe.quantize ...` of one point (run through CPU_CLOCK_CHILD)."""
    return [sys.executable, "-m", "eacmoe.quantize", "--model", str(checkpoint), "--out", str(out), "--overwrite",
            "--method", case.method, "--bits", "2", "--attn-bits", "4", "--group-size", "128",
            "--nsamples", str(case.nsamples), "--seqlen", str(case.seqlen), "--router-steps", str(case.router_steps),
            "--sparse-expert-policy", "pool", "--eval-samples", "1", "--eval-seqlen", "16", "--device", "cpu",
            "--dtype", "float32", "--lazy", "--threads", str(threads)]


def run_point(checkpoint: Path, out: Path, case: LayerCase, label: str, sweep: str, threads: int,
              log_file: Path) -> Point:
    """One quantize run in a child: CPU time and peak RSS from os.wait4, stages and expert tokens from report.json."""
    command = quantize_command(checkpoint, out, case, threads)
    child = [sys.executable, "-c", CPU_CLOCK_CHILD, *command[3:]]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    with open(log_file, "w") as sink:
        proc = subprocess.Popen(child, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {log_file}")
    report = json.loads((out / "report.json").read_text())
    layer = report["layers"][0]
    tokens = layer["expert_tokens"]
    sparse = set(layer["sparse_experts"])
    n = case.tokens
    measured_case = replace(case, hessian_tokens=sum(n if e in sparse else t for e, t in enumerate(tokens)),
                            gptq_experts=len(tokens), calibration_topk=(layer.get("router") or {}).get("topk"))
    shown = ["python", *command[1:]]
    return Point(label=label, sweep=sweep, case=measured_case, cpu_seconds=usage.ru_utime + usage.ru_stime,
                 peak_rss_bytes=usage.ru_maxrss * 1024, stage_seconds=dict(report["layer_seconds_by_stage"]),
                 wall_seconds=wall, timings=dict(report["timings_seconds"]), command=" ".join(shown))


def sweep_plan(args) -> list[tuple[str, str, dict]]:
    """(sweep, label, shape) of every point: the base, then each factor at its sizes with the others at base."""
    base = {"hidden": args.base_hidden, "intermediate": args.base_intermediate, "experts": args.base_experts,
            "nsamples": args.base_nsamples}
    plan = [("base", "base", dict(base))]
    for sweep, key, values in (("E", "experts", args.experts), ("H", "hidden", args.hidden),
                               ("I", "intermediate", args.intermediate), ("N", "nsamples", args.nsamples)):
        for v in values:
            if v != base[key]:
                shown = v * args.seqlen if key == "nsamples" else v
                plan.append((sweep, f"{sweep}={shown}", {**base, key: v}))
    return plan


def git_commit() -> str:
    """The measured code's commit (with "+changes" when the work tree differs from it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def measure(args) -> tuple[list[Point], dict[str, Point]]:
    mm = _measure_memory_module()
    work = args.work_dir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    points: list[Point] = []
    baselines: dict[str, Point] = {}
    partial = work / "points.json"

    def checkpoint_for(name: str, shape: dict) -> Path:
        ckpt = work / name
        mm.build_in_subprocess(ckpt, 1, argparse.Namespace(hidden=shape["hidden"], intermediate=shape["intermediate"],
                                                           experts=shape["experts"], vocab=8192))
        return ckpt

    plan = [("baseline", "baseline", {"hidden": 128, "intermediate": 128, "experts": args.base_experts,
                                      "nsamples": args.base_nsamples})] + sweep_plan(args)
    for sweep, label, shape in plan:
        ckpt = checkpoint_for(label.replace("=", "-"), shape)
        for method in args.methods:
            case = synthetic_case(shape["hidden"], shape["intermediate"], shape["experts"], shape["nsamples"],
                                  args.seqlen, method=method, router_steps=args.router_steps)
            out = work / f"out-{label.replace('=', '-')}-{method}"
            p = run_point(ckpt, out, case, label, sweep, args.threads, work / f"{label.replace('=', '-')}-{method}.log")
            shutil.rmtree(out, ignore_errors=True)
            (baselines.__setitem__(method, p) if sweep == "baseline" else points.append(p))
            log.info("%-8s %-5s cpu %6.1f s  wall %6.1f s  peak RSS %.2f GB  stages %s", label, method,
                     p.cpu_seconds, p.wall_seconds, p.peak_rss_bytes / 1e9,
                     {k: round(v, 2) for k, v in p.stage_seconds.items()})
            partial.write_text(json.dumps({"command": args.command, "threads": args.threads, "commit": args.commit,
                                           "points": [q.to_dict() for q in points],
                                           "baselines": {k: q.to_dict() for k, q in baselines.items()}}))
        shutil.rmtree(ckpt, ignore_errors=True)
    return points, baselines


# -- analysis, report --------------------------------------------------------------------------------------------
def memory_lambdas() -> dict:
    """lambda_load / lambda_save measured on the real-shape Mixtral slice (docs/memory/mixtral-8x7b.json)."""
    record = json.loads((REPO / "docs" / "memory" / "mixtral-8x7b.json").read_text())[0]
    return {k: record["constants"][k] for k in ("lambda_load", "lambda_save")}


def slice_records() -> list[dict]:
    records = []
    for path in sorted((REPO / "docs" / "memory").glob("*.json")):
        records.extend(json.loads(path.read_text()))
    return records


def analyse(points: list[Point], baselines: dict[str, Point], args) -> dict:
    """Fit (without and with the held-out points), the memory formula per point, the projections, the slice check."""
    held = list(args.holdout)
    validation = fit_cost_model(points, baselines, held)
    final = fit_cost_model(points, baselines, ())
    lambdas = memory_lambdas()
    memory_rows = []
    for p in points:
        base = baselines[p.case.method].peak_rss_bytes
        m = formula_memory(p.case, None, 4, base, lambdas)
        memory_rows.append({"method": p.case.method, "label": p.label, "measured_peak_rss": p.peak_rss_bytes,
                            "formula_peak": m["host_peak"], "formula_phase": m["host_peak_phase"],
                            "ratio": p.peak_rss_bytes / m["host_peak"]})
    projections = []
    for family in FULL_MODELS:
        config = load_bundled_config(family)
        for method in sorted(baselines):
            case = config_case(config, args.project_nsamples, args.project_seqlen, method=method)
            gpu_memory = formula_memory(case, config, 2, 0, lambdas)       # bf16 on a GPU, streams on the host
            cpu_memory = formula_memory(case, config, 4, baselines[method].peak_rss_bytes, lambdas)  # fp32 on CPU
            proj = project(final, family, config, args.project_nsamples, args.project_seqlen, method,
                           args.project_router_steps, memory={**gpu_memory, "cpu_host_peak": cpu_memory["host_peak"],
                                                             "cpu_host_peak_phase": cpu_memory["host_peak_phase"]})
            projections.append(proj)
    return {"validation_fit": asdict(validation), "final_fit": asdict(final),
            "validation": fit_table(points, baselines, validation), "fit_quality": fit_table(points, baselines, final),
            "memory": memory_rows, "projections": projections,
            "slices": slice_check(final, slice_records()),
            "assumptions": {"gpus": GPU_ASSUMPTIONS, "efficiency": GPU_EFFICIENCY, "launch_seconds": GPU_LAUNCH_SECONDS,
                            "reserved_bytes": GPU_RESERVED_BYTES, "terms": TERMS, "memory_lambdas": lambdas}}


def merge_measurements(data: list[dict]) -> tuple[list[Point], dict[str, Point], str, int, str]:
    """Points of saved runs: all of the first, then those of each later one whose (method, label) is new; the
    baselines, thread count and commit of the first; the measuring commands joined with " ; "."""
    points = [Point.from_dict(d) for d in data[0]["points"]]
    seen = {_key(p) for p in points}
    commands = [data[0].get("command", "")]
    for more in data[1:]:
        new = [Point.from_dict(d) for d in more["points"] if _key(Point.from_dict(d)) not in seen]
        points += new
        seen |= {_key(p) for p in new}
        if more.get("threads", data[0].get("threads")) != data[0].get("threads"):
            raise ValueError("--measurements: the files were measured with different thread counts")
        commands.append(more.get("command", ""))
    baselines = {k: Point.from_dict(d) for k, d in data[0]["baselines"].items()}
    return (points, baselines, " ; ".join(c for c in commands if c), data[0].get("threads", 1),
            data[0].get("commit", "unknown"))


def main(argv: list[str] | None = None) -> int:
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=positive_int, nargs="+", default=[4, 8, 16, 32],
                   help="sizes of the E sweep (routed experts; the others at base)")
    p.add_argument("--hidden", type=positive_int, nargs="+", default=[256, 512, 1024, 2048],
                   help="sizes of the H sweep (multiples of 128: the group size; 8 heads)")
    p.add_argument("--intermediate", type=positive_int, nargs="+", default=[512, 1024, 2048, 4096],
                   help="sizes of the I sweep (expert intermediate size, multiples of 128)")
    p.add_argument("--nsamples", type=positive_int, nargs="+", default=[8, 16, 32, 64, 256],
                   help="sizes of the N sweep in calibration sequences of --seqlen tokens")
    p.add_argument("--base-experts", type=positive_int, default=8, help="E at the base point")
    p.add_argument("--base-hidden", type=positive_int, default=512, help="H at the base point")
    p.add_argument("--base-intermediate", type=positive_int, default=1024, help="I at the base point")
    p.add_argument("--base-nsamples", type=positive_int, default=16, help="calibration sequences at the base point")
    p.add_argument("--seqlen", type=positive_int, default=256, help="tokens per calibration sequence")
    p.add_argument("--methods", nargs="+", default=["gptq", "qesc"], choices=["gptq", "qesc"],
                   help="quantization methods measured")
    p.add_argument("--router-steps", type=positive_int, default=50, help="router calibration steps (qesc)")
    p.add_argument("--holdout", nargs="*", default=["H=2048", "I=4096"],
                   help="labels of the points left out of the validation fit and predicted from it")
    p.add_argument("--project-nsamples", type=positive_int, default=128, help="calibration sequences of the projection")
    p.add_argument("--project-seqlen", type=positive_int, default=2048, help="their length")
    p.add_argument("--project-router-steps", type=positive_int, default=1000,
                   help="router steps of the projection (the CLI default; early stopping makes it an upper bound)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/eacmoe-scaling-law"),
                   help="synthetic checkpoints, outputs and run logs (checkpoints and outputs deleted after use)")
    p.add_argument("--measurements", type=Path, nargs="+", default=None,
                   help="re-fit and re-write from the points of earlier --json files instead of measuring (later "
                        "files add the points whose labels the earlier ones lack; baselines from the first)")
    p.add_argument("--json", type=Path, default=None, help="write every point, the fit and the projections here")
    p.add_argument("--write", type=Path, default=None, help="write the markdown report here (e.g. docs/SCALING.md)")
    p.add_argument("--plot", type=Path, default=None, help="write the log-log figure here (png)")
    add_threads_argument(p)
    args = p.parse_args(argv)
    args.threads = set_threads(args.threads)
    setup_logging()
    for name in ("hidden", "intermediate"):
        bad = [v for v in getattr(args, name) + [getattr(args, f"base_{name}")] if v % 128]
        if bad:
            print_error(f"--{name}: {bad} not a multiple of the group size 128")
            return 2
    if args.base_hidden % SYNTHETIC_HEADS:
        print_error(f"--base-hidden must be a multiple of {SYNTHETIC_HEADS} heads")
        return 2
    missing = [str(m) for m in args.measurements or [] if not m.is_file()]
    if missing:
        print_error(f"--measurements: no file {', '.join(missing)}")
        return 2
    given = argv if argv is not None else sys.argv[1:]
    command = args.command = command_line("python scripts/scaling_law.py", given, args.threads)
    written_by = command

    if args.measurements is not None:
        data = [json.loads(m.read_text()) for m in args.measurements]
        points, baselines, command, threads, args.commit = merge_measurements(data)
    else:
        args.commit = git_commit()
        points, baselines = measure(args)
        threads = args.threads
    result = {"command": command, "written_by": written_by, "commit": args.commit, "threads": threads, "cpu_count": os.cpu_count(),
              "dtype": "float32",
              "seqlen": points[0].case.seqlen, "router_steps": points[0].case.router_steps, "holdout": list(args.holdout),
              "points": [q.to_dict() for q in points], "baselines": {k: q.to_dict() for k, q in baselines.items()},
              **analyse(points, baselines, args)}
    for row in result["validation"]:
        if row["held_out"]:
            log.info("held out %s %s: measured %.1f s, predicted %.1f s (ratio %.2f)", row["method"], row["label"],
                     row["measured_seconds"], row["fitted_seconds"], row["ratio"])
    for proj in result["projections"]:
        log.info("PROJECTED %s %s: this CPU %.1f h; %s", proj["family"], proj["method"],
                 proj["cpu"]["model_seconds"] / 3600,
                 "; ".join(f"{g} {v['model_seconds'] / 60:.0f} min, {'fits' if v.get('fits') else 'does not fit'}"
                           for g, v in proj["gpus"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        write_plot(args.plot, result)
    if args.write:
        write_doc(args.write, result, args.plot, args.json)
    return 0


SWEEP_FIELDS = {"E": "experts", "H": "hidden", "I": "intermediate", "N": "nsamples"}
SWEEP_NAMES = {"E": "routed experts E", "H": "hidden size H", "I": "expert intermediate size I",
               "N": "calibration tokens N"}


def write_plot(path: Path, result: dict) -> None:
    """Log-log compute seconds (CPU time minus the baseline's) against each factor: measured points, and the final
    fit's curve with the others at the base point (uniform routing for the curve, the measured routing at points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit = Fit(**result["final_fit"])
    points = [Point.from_dict(d) for d in result["points"]]
    baselines = {k: Point.from_dict(d) for k, d in result["baselines"].items()}
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    colors = {"gptq": "tab:blue", "qesc": "tab:orange"}
    for ax, (sweep, key) in zip(axes.flat, SWEEP_FIELDS.items()):
        for method, color in colors.items():
            mine = [p for p in points if p.case.method == method and p.sweep in (sweep, "base")]
            if not mine:
                continue
            base = baselines[method]
            mine.sort(key=lambda p: getattr(p.case, key))
            x = [getattr(p.case, key) * (p.case.seqlen if key == "nsamples" else 1) for p in mine]
            measured = [p.cpu_seconds - base.cpu_seconds for p in mine]
            fitted = [fit.total_seconds(p.case) - fit.total_seconds(base.case) for p in mine]
            held = [p.label in result["holdout"] for p in mine]
            ax.scatter([v for v, h in zip(x, held) if not h], [m for m, h in zip(measured, held) if not h],
                       color=color, label=f"{method} measured")
            if any(held):
                ax.scatter([v for v, h in zip(x, held) if h], [m for m, h in zip(measured, held) if h],
                           facecolors="none", edgecolors=color, s=80, label=f"{method} measured, held out")
            ax.scatter(x, fitted, marker="x", color=color, label=f"{method} fitted at the point")
            grid = np.geomspace(min(getattr(p.case, key) for p in mine), max(getattr(p.case, key) for p in mine), 40)
            template = replace(mine[0].case, hessian_tokens=None, gptq_experts=None)
            curve = [fit.total_seconds(replace(template, **{key: max(1, int(round(v)))}))
                     - fit.total_seconds(base.case) for v in grid]
            ax.plot(grid * (template.seqlen if key == "nsamples" else 1), curve, color=color, lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(SWEEP_NAMES[sweep])
        ax.set_ylabel("CPU s minus baseline (1 thread)")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"eacmoe quantize, one synthetic MoE layer (MEASURED points, fitted lines); "
                 f"{result['threads']} thread(s), {result['dtype']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _s(x: float) -> str:
    return f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _rate(term: str, coefficient: float) -> str:
    _, per_unit, kind = TERMS[term]
    if coefficient <= 0:
        return "0 (not needed by the fit)"
    if kind == "dispatch":
        return f"{coefficient * 1e6:.2f} us per unit"
    if kind == "host":
        return f"{coefficient * 1e9:.2f} ns per parameter"
    return f"{per_unit / coefficient / 1e9:.1f} GFLOP/s"


def report_markdown(result: dict, plot: Path | None, json_path: Path | None, doc_dir: Path = REPO / "docs") -> str:
    measured_by, written_by = result["command"], result.get("written_by", result["command"])
    points = [Point.from_dict(d) for d in result["points"]]
    baselines = {k: Point.from_dict(d) for k, d in result["baselines"].items()}
    by_key = {(r["method"], r["label"]): r for r in result["fit_quality"]}
    memory = {(r["method"], r["label"]): r for r in result["memory"]}
    fit = result["final_fit"]["coefficients"]
    t = result["threads"]
    lines = [
        "# Scaling law of `python -m eacmoe.quantize` (time and peak memory against E, H, I, N)",
        "",
        "Generated by `scripts/scaling_law.py`. To measure and write everything again (one command, about 10 minutes "
        "of one core):",
        "",
        f"    {RERUN}",
        "",
        f"The numbers below were measured ({t} torch thread(s), on a {result['cpu_count']}-core machine shared with "
        "other jobs) by",
        "",
        *[f"    {c}" for c in measured_by.split(" ; ")],
        "",
        *([] if written_by == measured_by else
          ["and this page, its json and its plot written from those points (`--measurements`: re-fit without "
           "measuring again) by", "", f"    {written_by}", ""]),
        "Three parts, kept apart: **MEASURED** (runs on this CPU), **FITTED** (a cost model with physical terms, "
        "non-negative least squares on the measured points), **PROJECTED** (the fitted model and stated assumptions "
        "at full model sizes; nothing projected was run).",
        "",
        "## MEASURED",
        "",
        f"Code measured: commit `{result.get('commit', 'unknown')}`. Each point is one `python -m eacmoe.quantize` run on a one-layer synthetic random Mixtral-style MoE "
        f"(scripts/measure_memory.py's builder: 8 heads, 2 KV heads, top-2, router std 0.3, fp32 safetensors): "
        f"methods {' and '.join(sorted(baselines))}, 2-bit experts, 4-bit attention, group 128, `--sparse-expert-policy pool`, "
        f"`--router-steps {result['router_steps']}`, `--seqlen {result['seqlen']}`, {result['dtype']}, CPU, "
        f"`--lazy`, `--threads {t}`, final evaluation cut to 1 x 16 tokens. CPU time is user + sys of the child "
        "(`os.wait4`), peak RSS its `ru_maxrss`; the stage seconds are LayerReport.seconds from report.json, read "
        "as CPU seconds (the child runs with `time.perf_counter` replaced by `time.process_time`). **compute** = "
        "CPU time minus the baseline's: the same command on a tiny layer (H = I = 128, same E and N), so start-up "
        "(Python, torch, transformers, tokenizer, calibration text) is not counted. Each sweep moves one factor; "
        "the others stay at the base point.",
        "",
    ]
    total_cpu = sum(p.cpu_seconds for p in points) + sum(b.cpu_seconds for b in baselines.values())
    lines += [f"The {len(points) + len(baselines)} runs took {total_cpu / 60:.1f} min of CPU in all (checkpoint "
              "building not counted).", ""]
    for m, b in sorted(baselines.items()):
        lines.append(f"- baseline {m}: {b.cpu_seconds:.1f} s CPU, peak RSS {b.peak_rss_bytes / 1e9:.2f} GB "
                     f"(stages {', '.join(f'{k} {v:.2f} s' for k, v in b.stage_seconds.items())})")
    lines += ["", "| method | point | H | I | E | N | expert Hessian tokens | CPU s | compute s | attention s | "
              "router s | experts s | advance s | peak RSS | formula peak | measured / formula |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"base": 0, "E": 1, "H": 2, "I": 3, "N": 4}
    for p in sorted(points, key=lambda p: (p.case.method, order.get(p.sweep, 9), p.case.experts, p.case.hidden,
                                           p.case.intermediate, p.case.nsamples)):
        c, q, mem = p.case, by_key[(p.case.method, p.label)], memory[(p.case.method, p.label)]
        st = p.stage_seconds
        lines.append(f"| {c.method} | {p.label}{' (held out)' if p.label in result['holdout'] else ''} | {c.hidden} | "
                     f"{c.intermediate} | {c.experts} | {c.tokens} | {c.hessian_tokens} | {_s(p.cpu_seconds)} | "
                     f"{_s(q['measured_seconds'])} | {_s(st.get('attention', 0))} | {_s(st.get('router', 0))} | "
                     f"{_s(st.get('experts', 0))} | {_s(st.get('advance', 0))} | {p.peak_rss_bytes / 1e9:.2f} GB | "
                     f"{mem['formula_peak'] / 1e9:.2f} GB | {mem['ratio']:.2f} |")
    lines += ["", "The formula peak is eacmoe/quant_memory.py's `layer_peak` (fp32, the method's phases, pooled "
              "experts, base = the baseline run's peak RSS, lambda_load / lambda_save measured on the real-shape "
              f"Mixtral slice: {result['assumptions']['memory_lambdas']['lambda_load']:.2f} / "
              f"{result['assumptions']['memory_lambdas']['lambda_save']:.2f}, docs/memory/mixtral-8x7b.json).", ""]
    if plot is not None:
        lines += [f"![compute seconds against each factor]({os.path.relpath(plot.resolve(), doc_dir.resolve())})", "",
                  "Dots: measured (hollow: held out of the validation fit); crosses: the fit at that point with the "
                  "run's own routing (expert Hessian tokens from its report); lines: the fit along the factor with "
                  "uniform routing, which pools every expert once 2N/E falls under H (the steps).", ""]

    lines += ["## FITTED", "",
              "Each stage's seconds = sum over terms of c_term x (units of that term the stage does), the units "
              "counted from the layer's shapes the way the pipeline works (scripts/scaling_law.py `stage_work`: "
              "q/k/v/o each with its own Hessian and factorisation; gate and up share one; the down projection's "
              "input from the quantized gate and up; an expert under its input width in tokens is pooled, so the "
              "expert Hessian tokens are read from each run's report). The coefficients are shared by all stages "
              "and fitted by non-negative least squares on relative errors of the baseline-subtracted stage "
              "seconds; the whole run adds the unstaged capture forward (same coefficients) and a per-parameter "
              "term fitted on the rest of the CPU time (loading, weight scan, evaluation, packing, saving).", "",
              "| term | counts | seconds per unit | effective rate |", "|---|---|---|---|"]
    for term, (what, _, _) in TERMS.items():
        lines.append(f"| {term} | {what} | {fit[term]:.3g} | {_rate(term, fit[term])} |")
    lines += ["", "Fit quality, all points in the fit (compute seconds, measured / fitted; the stage columns are "
              "measured / fitted of that stage's baseline-subtracted seconds):", "",
              "| method | point | measured s | fitted s | measured / fitted | attention | router | experts | advance |",
              "|---|---|---|---|---|---|---|---|---|"]

    def ratio(stage: dict) -> str:
        return f"{stage['measured'] / stage['fitted']:.2f}" if stage["fitted"] > 0.05 else "-"

    for r in result["fit_quality"]:
        lines.append(f"| {r['method']} | {r['label']} | {_s(r['measured_seconds'])} | {_s(r['fitted_seconds'])} | "
                     f"{r['ratio']:.2f} | " + " | ".join(ratio(r["stages"][s]) for s in STAGES) + " |")
    ratios = [r["ratio"] for r in result["fit_quality"] if r["ratio"] > 0 and math.isfinite(r["ratio"])]
    lines += ["", f"measured / fitted over all {len(ratios)} points: {min(ratios):.2f} to {max(ratios):.2f} "
              f"(geometric mean {math.exp(np.mean(np.log(ratios))):.2f}).", ""]
    held = [r for r in result["validation"] if r["held_out"]]
    if held:
        lines += [f"**Validation**: the fit refitted without {', '.join(result['holdout'])} predicts them:", "",
                  "| method | held-out point | measured s | predicted s | measured / predicted |", "|---|---|---|---|---|"]
        for r in held:
            lines.append(f"| {r['method']} | {r['label']} | {_s(r['measured_seconds'])} | {_s(r['fitted_seconds'])} | "
                         f"{r['ratio']:.2f} |")
        lines += [""]
        if all(r["ratio"] < 1 for r in held):
            lines += [f"All held-out points ran faster than predicted ({min(r['ratio'] for r in held):.2f} to "
                      f"{max(r['ratio'] for r in held):.2f}): the dense kernels (Hessians, factorisations) get more "
                      "efficient with size, which a constant cost per flop does not capture, so projections to much "
                      "wider matrices lean high (upper bounds rather than estimates).", ""]
        lines += ["The projections below use the fit on all points.", ""]

    a = result["assumptions"]
    lines += ["## PROJECTED (not measured)", "",
              f"Full models from eacmoe/assets/configs at {result['projections'][0]['tokens']} calibration tokens "
              f"(128 x 2048), router steps {result['projections'][0]['router_steps']} (the CLI default; early "
              "stopping makes it an upper bound), uniform routing (expert Hessian tokens = k N; no expert is pooled at "
              "these sizes), every layer like layer 0, the model's embedding/head and the final export not counted.",
              "",
              f"- **this CPU**: the fitted coefficients, {t} thread (no thread ratio was measured: 2 threads are "
              "not projected).",
              "- **GPUs**: flop terms at a fraction of the card's datasheet peak (dense): forwards in bf16 "
              f"({a['efficiency']['fwd']:.0%} of the bf16 tensor peak), GPTQ arithmetic in fp32 "
              f"({a['efficiency']['fp32']:.0%} of the fp32 peak, no TF32), Cholesky / inverse "
              f"({a['efficiency']['factor']:.0%} of the fp32 peak), the router's statistics in fp64 "
              f"({a['efficiency']['fp64']:.0%} of the fp64 peak); dispatch terms at "
              f"{a['launch_seconds'] * 1e6:.0f} us per launch (launches per unit: "
              + ", ".join(f"{k} {v[1]:.0f}" for k, v in TERMS.items() if v[2] == "dispatch")
              + "); the per-parameter work at this CPU's fitted rate (it stays on the host). Peaks assumed: "
              + "; ".join(f"{g}: " + ", ".join(f"{k} {v / 1e12:g} TFLOPS" for k, v in spec["peak_flops"].items())
                          for g, spec in a["gpus"].items()) + ".",
              "- **memory**: eacmoe/quant_memory.py's device peak (bf16 weights on the GPU, streams in host memory) "
              f"plus {a['reserved_bytes'] / 2**30:.0f} GiB for the CUDA context must fit the card; the CPU column is "
              "its host peak in fp32 (the CPU default dtype), without the process base.", "",
              "| model | method | this CPU, 1 thread | per layer: attention / router / experts / advance / capture "
              "(CPU s) | " + " | ".join(f"{g}: time, device peak, fits" for g in a["gpus"]) + " | CPU host peak |",
              "|---|---|---|---|" + "---|" * len(a["gpus"]) + "---|"]
    for proj in result["projections"]:
        st = proj["cpu"]["stage_seconds_per_layer"]
        gpu_cells = [f"{_duration(v['model_seconds'])}, {v['device_peak_bytes'] / 2**30:.1f} GiB, "
                     f"{'fits' if v['fits'] else 'does NOT fit'}" for v in proj["gpus"].values()]
        lines.append(f"| {proj['family']} ({proj['layers']} layers) | {proj['method']} | "
                     f"{_duration(proj['cpu']['model_seconds'])} | "
                     + " / ".join(_s(st[s]) for s in (*STAGES, "capture")) + " | " + " | ".join(gpu_cells)
                     + f" | {proj['memory']['cpu_host_peak'] / 2**30:.1f} GiB |")
    lines += ["", "Where the projected GPU time goes (per layer, seconds: flop terms / dispatch / host):", ""]
    for proj in result["projections"]:
        lines.append(f"- {proj['family']} {proj['method']}: " + "; ".join(
            f"{g} {v['parts_per_layer']['flops']:.1f} / {v['parts_per_layer']['dispatch']:.1f} / "
            f"{v['parts_per_layer']['host']:.1f}" for g, v in proj["gpus"].items()))
    lines += ["", "### Check against the real-shape slice runs (docs/memory/*.json)", "",
              "The recorded real-shape slice runs (scripts/measure_real_shape_memory.py; random weights with the "
              "real layer dimensions: they measure cost, not accuracy) ran in **bfloat16** (this fit is float32), "
              "with the experts rounded to nearest (`--sparse-expert-policy rtn`: at 16 x 512 tokens every expert "
              "falls under its input width; the model then counts no expert GPTQ) or calibrated on the pooled tokens "
              "(`pool`: GPTQ on all of them), and **under load** (wall-clock seconds from the process start to the "
              "last layer's progress file, start-up and the weight scan included, other jobs on the same 2 cores): "
              "a rough check, not a validation. A ratio above 1 is what a share of the core below 1 / ratio gives.",
              "",
              "| slice | layers | method | experts | tokens | measured loop s (wall, loaded, bf16) | predicted s (fp32 "
              "fit) | measured / predicted |", "|---|---|---|---|---|---|---|---|"]
    for r in result["slices"]:
        lines.append(f"| {r['family']} | {r['layers']} | {r['method']} | "
                     f"{'GPTQ (pooled tokens)' if r['experts_gptq'] else 'RTN'} | {r['tokens']} | "
                     f"{r['measured_loop_seconds']:.0f} | {r['predicted_seconds']:.0f} | {r['ratio']:.2f} |")
    lines += ["", "Commands of those runs: " + "; ".join(f"`{r['command']}`" for r in result["slices"]) + ".", ""]
    lines += ["## Limits of this model", "",
              "- The counts follow the pipeline of the measured commit (`stage_work`): one Hessian and factorisation "
              "per attention Linear, one GPTQ call per expert matrix, the quantized stream's advance recomputing "
              "attention. A pipeline that batches experts or shares the q/k/v Hessian changes the counts: update "
              "`stage_work` (ATTENTION_HESSIAN_PER_LINEAR and the expert terms) and rerun the command above.",
              "- Synthetic random weights: they fix the shapes, not the routing of a trained model (the expert Hessian "
              "tokens are read from each run; the projection assumes uniform routing, which leaves the sum k N "
              "unchanged).",
              f"- Extrapolation: measured up to H = {max(p.case.hidden for p in points)}, I = "
              f"{max(p.case.intermediate for p in points)}, E = {max(p.case.experts for p in points)}, N = "
              f"{max(p.case.tokens for p in points)}; the projections go to H 4096, I 14336, E 128 and N "
              f"{result['projections'][0]['tokens']}.",
              "- One thread only; the fitted rates are this shared CPU's, measured while other jobs ran.",
              "- The GPU rows are arithmetic on stated assumptions (peaks, fractions, launch cost), not runs.", ""]
    if json_path is not None:
        lines += [f"Every point, both fits and the projections: `{os.path.relpath(json_path.resolve(), REPO)}`.", ""]
    return "\n".join(lines)


def write_doc(path: Path, result: dict, plot: Path | None, json_path: Path | None) -> None:
    """The report, written whole (to a temporary file first: nothing half-written on failure)."""
    text = report_markdown(result, plot, json_path, path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
