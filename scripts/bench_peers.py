"""eacmoe beside the peers: GPTQModel, llm-compressor and eacmoe quantizing the same model with the same tokens.

    python scripts/bench_peers.py --models tiny-mixtral tiny-qwen-moe --schemes w2g64 w4g64 --repeats 2 \\
        --threads 1 --json docs/peers.json --markdown docs/peers.md

Accuracy over calibration seeds in the paper's setting (2-bit experts, 4-bit attention), one run per seed, then a
table of all seeds::

    for s in 0 1 2; do python scripts/bench_peers.py --models tiny-mixtral --schemes w2a4g128 --seed $s \\
        --methods eacmoe-gptq eacmoe-default gptqmodel-matched --repeats 1 --threads 1 --json s$s.json; done
    python scripts/bench_peers.py --from-json s0.json s1.json s2.json --seed-summary --markdown seeds.md

For every model and scheme (bits of experts and attention, group size; the router and the LM head stay FP in
every method) the same calibration tokens (``eacmoe.calibration.get_calibration_data``: ``--calib``, ``--nsamples``
x ``--seqlen``, ``--seed``) are handed to each method in turn, each in its own subprocess, so that wall time and
peak resident memory (the kernel's ``ru_maxrss`` of that child, read with ``os.wait4``) belong to that method alone:

- ``eacmoe-gptq`` / ``eacmoe-qesc``: ``python -m eacmoe.quantize --method gptq|qesc --grid minmax`` (packed export),
  the peers' grid, so that these rows compare like for like;
- ``eacmoe-default``: ``python -m eacmoe.quantize`` with its own defaults (QESC and the ``--grid mse`` range search),
  what a user gets; for accuracy against the peers at the same bits;
- ``gptqmodel-default``: GPTQModel's defaults (sym, damp 0.05, act_group_aware, FailSafe RTN for modules that get
  under 0.5% of the calibration tokens, offload to disk, batch 1) with our bits and group size;
- ``gptqmodel-matched``: GPTQModel with our settings (asym, damp = ours, act_group_aware off, desc_act as ours,
  batch 8 like ours); its RTN fallback threshold is stated in the table;
- ``llmcompressor-gptq``: llm-compressor's GPTQModifier (oneshot, its own virtual environment, created here on
  first use beside CPU torch; a failure to install or to run becomes a row with the error line).

Every exported model is then loaded by its own loader (eacmoe's packed runtime through transformers'
trust_remote_code, ``GPTQModel.load``, compressed-tensors through transformers in llm-compressor's environment) in
another subprocess, in float32, and measured on the same held-out windows against the FP model: perplexity and
KL(FP || quantized) per token on the bundled test split (all and per domain) and WikiText-2 when a copy is found
(``eacmoe.heldout``), and the lm-eval suite (eval/run_suite.py) with ``--suite``. Times and peaks are ratios to
``eacmoe-gptq`` of the same model and scheme, measured in the same run. This parent process never imports torch:
Linux carries a process's peak RSS into its children's ``ru_maxrss``.

Child modes (``--worker prepare|gptqmodel|llmcompressor|evaluate``) are this file run again; they are internal.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eacmoe.threads import add_threads_argument  # noqa: E402 - imports no torch: the parent only measures children

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
log = logging.getLogger("bench_peers")

LLMC_VENV = REPO / ".venv-llmcompressor"
LLMC_REQUIREMENTS = ("torch==2.13.0", "llmcompressor==0.14.*")
REFERENCE_METHOD = "eacmoe-gptq"
DOMAINS = ("sotu", "brown", "shakespeare", "pydoc")
HELDOUT_SOURCES = ("bundled-test", *(f"bundled-test:{d}" for d in DOMAINS), "wikitext2")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
GPTQMODEL_FALLBACK = "RTN below 0.5% of calibration tokens (GPTQModel default, kept)"


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Scheme:
    """Bits of the quantized Linears (experts and dense MLPs; attention ``attn_bits``) and the group size."""
    name: str
    bits: int                      # the experts' width (with ``paper_schedule``: the lower one, 2)
    group_size: int
    attn_bits: int | None = None   # None: attention at ``bits`` too
    paper_schedule: bool = False   # experts at EAC-MoE's 2.5: the first half of the layers 3-bit, the rest 2-bit

    @property
    def attention_bits(self) -> int:
        return self.bits if self.attn_bits is None else self.attn_bits

    @property
    def expert_bits(self) -> str:
        """The experts' ``--bits`` of eacmoe.quantize."""
        return "2.5" if self.paper_schedule else str(self.bits)


def parse_scheme(text: str) -> Scheme:
    """``w2g64`` -> every Linear 2-bit, group 64; ``w2a4g128`` -> experts 2-bit, attention 4-bit, group 128;
    ``w2.5a4g128`` -> experts on the paper's 2.5 schedule; ``w4g-1`` -> 4-bit per channel."""
    match = re.fullmatch(r"w([2348]|2\.5)(?:a([2348]))?g(-1|\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"scheme {text!r}: expected wBgG or wBaAgG (B one of 2, 2.5, 3, 4, 8), "
                                         "e.g. w2g64, w2a4g128, w2.5a4g128 or w4g-1")
    paper = match.group(1) == "2.5"
    if paper and not match.group(2):
        raise argparse.ArgumentTypeError(f"scheme {text!r}: the 2.5 schedule needs the attention width (w2.5a4gG)")
    return Scheme(text, 2 if paper else int(match.group(1)), int(match.group(3)),
                  int(match.group(2)) if match.group(2) else None, paper)


def peer_scheme_args(scheme: Scheme) -> list[str]:
    """A peer worker's ``--attn-bits`` when attention differs from the experts, and ``--paper-schedule`` for the
    2.5 schedule (else nothing: the command, and so a recorded run's reuse key, stays what it was before schemes
    had attention bits)."""
    return ([] if scheme.attn_bits is None else ["--attn-bits", str(scheme.attn_bits)]) + \
        (["--paper-schedule"] if scheme.paper_schedule else [])


ATTENTION_PATTERN = r".*\.self_attn\..*"  # every attention Linear of the supported families (module paths)


def layer_mlp_pattern(layer: int) -> str:
    return rf".*\.layers\.{layer}\.mlp\..*"


def gptqmodel_dynamic(attn_bits: int | None, layer_bits: Sequence[int] | None = None,
                      bits: int | None = None) -> dict | None:
    """GPTQModel's ``dynamic`` overrides: attention at its own width, and every layer whose MLP / experts width
    (``layer_bits``) differs from the default ``bits`` (None: no override)."""
    dynamic = {} if attn_bits is None else {f"+:{ATTENTION_PATTERN}": {"bits": attn_bits}}
    for layer, width in enumerate(layer_bits or []):
        if width != bits:
            dynamic[f"+:{layer_mlp_pattern(layer)}"] = {"bits": width}
    return dynamic or None


@dataclass
class Job:
    """One quantization by one method: what its command needs."""
    model: str
    model_dir: str
    scheme: Scheme
    calib_file: str
    out_dir: str
    threads: int
    nsamples: int
    seqlen: int
    calib: str
    seed: int
    damp_percent: float
    llmc_python: str


@dataclass(frozen=True)
class Method:
    """One quantizer under test: its command, how its export is loaded, and the settings it ran with."""
    name: str
    loader: str                                   # evaluate worker's loader: eacmoe, gptqmodel, compressed-tensors
    command: Callable[[Job], list[str]]
    settings: Callable[[Job], str]
    python: Callable[[Job], str] = lambda job: sys.executable


def _eacmoe(method: str, grid: str = "minmax", name: str | None = None) -> Method:
    def command(job: Job) -> list[str]:
        return [sys.executable, "-m", "eacmoe.quantize", "--model", job.model_dir, "--method", method,
                "--bits", job.scheme.expert_bits, "--attn-bits", str(job.scheme.attention_bits),
                "--group-size", str(job.scheme.group_size), "--calib", job.calib, "--nsamples", str(job.nsamples),
                "--seqlen", str(job.seqlen), "--seed", str(job.seed), "--threads", str(job.threads),
                "--eval-samples", "1", "--eval-seqlen", "16", "--out", job.out_dir, "--overwrite",
                "--grid", grid,  # minmax: the peers' grid (GPTQModel mse=0, llm-compressor's minmax observer)
                *(["--dtype", "bfloat16"] if is_real_shape_slice(job.model_dir) else [])]  # else auto: fp32 on CPU

    def settings(job: Job) -> str:
        extra = ", router TopK-MSE calibration" if method == "qesc" else ""
        grid_text = "min/max grid" if grid == "minmax" else "range-search (mse) grid"
        return (f"{model_dtype(job.model_dir)} model, asym, {grid_text}, damp {job.damp_percent}, no act-order, "
                f"block 128, batch 8; experts under their input width in tokens use the layer's pooled tokens{extra}")
    return Method(name or f"eacmoe-{method}", "eacmoe", command, settings)


def _gptqmodel(preset: str) -> Method:
    def command(job: Job) -> list[str]:
        dtype = ["--dtype", model_dtype(job.model_dir)] if preset == "matched" else []  # default: its own auto
        return [sys.executable, str(SCRIPT), "--worker", "gptqmodel", "--preset", preset, "--model-dir",
                job.model_dir, "--calib-file", job.calib_file, "--out-dir", job.out_dir,
                "--bits", str(job.scheme.bits), "--group-size", str(job.scheme.group_size),
                "--damp", str(job.damp_percent), "--threads", str(job.threads), *dtype,
                *peer_scheme_args(job.scheme)]

    def settings(job: Job) -> str:
        if preset == "default":
            return ("bfloat16 model (its CPU auto dtype), sym, damp 0.05, act_group_aware on, desc_act off, batch 1, "
                    "offload to disk; " + GPTQMODEL_FALLBACK)
        return (f"{model_dtype(job.model_dir)} model, asym, damp {job.damp_percent}, act_group_aware off, desc_act "
                "off, batch 8, no disk offload; " + GPTQMODEL_FALLBACK)
    return Method(f"gptqmodel-{preset}", "gptqmodel", command, settings)


def _llmcompressor() -> Method:
    def command(job: Job) -> list[str]:
        return [job.llmc_python, str(SCRIPT), "--worker", "llmcompressor", "--model-dir", job.model_dir,
                "--calib-file", job.calib_file, "--out-dir", job.out_dir, "--bits", str(job.scheme.bits),
                "--group-size", str(job.scheme.group_size), "--damp", str(job.damp_percent),
                "--threads", str(job.threads), *peer_scheme_args(job.scheme)]

    def settings(job: Job) -> str:
        return (f"asym, dampening_frac {job.damp_percent}, actorder off, block 128, all experts calibrated on all "
                "tokens (its default), sequential pipeline")
    return Method("llmcompressor-gptq", "compressed-tensors", command, settings, python=lambda job: job.llmc_python)


METHODS: dict[str, Method] = {m.name: m for m in (
    _eacmoe("gptq"), _eacmoe("qesc"), _eacmoe("qesc", "mse", "eacmoe-default"), _gptqmodel("default"),
    _gptqmodel("matched"), _llmcompressor())}


# ------------------------------------------------------------------------------------------------ measuring
@dataclass
class Measured:
    returncode: int
    seconds: float
    cpu_seconds: float    # user + system time of the child and the children it waited for
    peak_rss_bytes: int
    log_tail: str


def run_measured(command: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 timeout: float | None = None) -> Measured:
    """Run ``command`` with its output in ``log_path``; wall seconds and the child's own peak RSS (os.wait4)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        out.write("$ " + shlex.join(command) + "\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                out.write(f"\nbench_peers: killed after {timeout:.0f} s (--timeout)\n")
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(proc.returncode, seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024,
                    log_path.read_text(errors="replace")[-20000:])


_ERROR_LINE = re.compile(r"^(?:[\w.]+(?:Error|Exception|Exit|Interrupt)\b|error:|ERROR\b|bench_peers: )")


def error_line(text: str) -> str:
    """The line of a failed child's output that says why: its last exception/``error:`` line, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.match(line):
            return line[:400]
    return lines[-1][:400] if lines else "(no output)"


def child_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    env.update(extra or {})
    return env


def ensure_llmc_venv(venv: Path, log_path: Path) -> tuple[str | None, str | None]:
    """(python of llm-compressor's own environment, None) or (None, the error line): created on first use."""
    python = venv / "bin" / "python"
    marker = venv / ".bench-peers-ready"
    if marker.is_file():
        return str(python), None
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", LLMC_REQUIREMENTS[0]],
             [str(python), "-m", "pip", "install", "--quiet", *LLMC_REQUIREMENTS]]
    for number, step in enumerate(steps):
        result = run_measured(step, log_path.with_name(f"{log_path.stem}-{number}.log"))
        if result.returncode != 0:
            return None, f"`{shlex.join(step[-3:])}` failed: {error_line(result.log_tail)}"
    marker.write_text(" ".join(LLMC_REQUIREMENTS) + "\n")
    return str(python), None


# ------------------------------------------------------------------------------------------------ rows and tables
def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize_runs(runs: list[dict]) -> dict[str, Any]:
    """Median wall seconds / peak RSS over a method's successful runs, with the spread."""
    ok = [r for r in runs if r["returncode"] == 0]
    seconds = [r["seconds"] for r in ok]
    cpu = [r["cpu_seconds"] for r in ok]
    peaks = [r["peak_rss_bytes"] for r in ok]
    return {"seconds": _median(seconds), "seconds_all": seconds, "cpu_seconds": _median(cpu), "cpu_seconds_all": cpu,
            "peak_rss_bytes": _median(peaks),
            "peak_rss_all": peaks, "quantize_seconds": _median([r["quantize_seconds"] for r in ok
                                                                if r.get("quantize_seconds") is not None])}


def add_ratios(rows: list[dict], reference: str = REFERENCE_METHOD) -> list[dict]:
    """Each row's time and peak as a multiple of the reference method's row of the same model and scheme."""
    refs = {(r["model"], r["scheme"]): r for r in rows if r["method"] == reference and r.get("seconds")}
    for row in rows:
        ref = refs.get((row["model"], row["scheme"]))
        ok = ref is not None and row.get("seconds") is not None
        row["time_ratio"] = row["seconds"] / ref["seconds"] if ok else None
        row["cpu_ratio"] = row["cpu_seconds"] / ref["cpu_seconds"] if ok else None
        row["peak_ratio"] = row["peak_rss_bytes"] / ref["peak_rss_bytes"] if ok else None
    return rows


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _source_cell(row: dict, source: str) -> str:
    metric = (row.get("eval") or {}).get(source)
    if row.get("eval_skipped"):
        return "not measured (cost only)"
    if not metric:
        return "-"
    return f"{metric['ppl']:.2f} / {metric['kl']:.3f}"


def _spread(values: Sequence[float]) -> str:
    return "" if len(values) < 2 else f" ({min(values):.1f}-{max(values):.1f})"


def markdown_table(rows: list[dict], sources: Sequence[str]) -> str:
    """One line per (model, scheme, method): wall and CPU time, peak RSS, their ratios to eacmoe-gptq, held-out
    ppl / KL per source, the suite; a failed method's line says why."""
    labels = {"bundled-test": "test all"}
    labels.update({f"bundled-test:{d}": d for d in DOMAINS})
    head = ["model", "scheme", "method", "wall s (min-max)", "x", "CPU s", "x", "peak RSS GB", "x",
            *(f"{labels.get(s, s)} ppl / KL" for s in sources), "suite cloze / nextsent acc %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for row in rows:
        if row.get("error"):
            cells = [row["model"], row["scheme"], row["method"], f"failed: {row['error']}", *["-"] * (len(head) - 4)]
        else:
            suite = row.get("suite") or {}
            suite_cell = ("-" if not suite else
                          f"{100 * suite.get('cloze_acc', float('nan')):.1f} / "
                          f"{100 * suite.get('nextsent_acc', float('nan')):.1f}")
            peak = row.get("peak_rss_bytes")
            cells = [row["model"], row["scheme"], row["method"],
                     ("-" if row.get("seconds") is None else
                      f"{row['seconds']:.1f}{_spread(row.get('seconds_all', []))}"),
                     _f(row.get("time_ratio")), _f(row.get("cpu_seconds"), 1), _f(row.get("cpu_ratio")),
                     "-" if peak is None else f"{peak / 1e9:.2f}", _f(row.get("peak_ratio")),
                     *((_source_cell(row, s) for s in sources) if not row.get("eval_error") else
                       [f"evaluation failed: {row['eval_error']}", *["-"] * (len(sources) - 1)]),
                     suite_cell]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def front_page_table(rows: list[dict], model: str, scheme: str, source: str = "bundled-test") -> str:
    """The README's small table: method | time ratio | peak ratio | held-out ppl, for one model and scheme."""
    lines = ["| method | wall time x eacmoe-gptq | CPU time x | peak RSS x | held-out ppl |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        if row["model"] != model or row["scheme"] != scheme:
            continue
        if row.get("error"):
            lines.append(f"| {row['method']} | failed | - | - | - |")
            continue
        metric = (row.get("eval") or {}).get(source) or {}
        lines.append(f"| {row['method']} | {_f(row.get('time_ratio'))} | {_f(row.get('cpu_ratio'))} | "
                     f"{_f(row.get('peak_ratio'))} | "
                     f"{_f(metric.get('ppl'))} |")
    return "\n".join(lines)


def settings_table(rows: list[dict]) -> str:
    seen: dict[str, str] = {}
    for row in rows:
        seen.setdefault(row["method"], row.get("settings", ""))
    return "\n".join(["| method | settings |", "|---|---|", *(f"| {m} | {s} |" for m, s in seen.items())])


COMPARABLE_SETTINGS = ("calib", "nsamples", "seqlen", "seed", "eval_samples", "eval_seqlen", "damp", "threads")


def _check_comparable(results: list[dict], ignore: tuple[str, ...] = ()) -> None:
    first = results[0]["meta"]
    for other in results[1:]:
        for key in COMPARABLE_SETTINGS:
            if key not in ignore and other["meta"][key] != first[key]:
                raise SystemExit(f"error: --from-json: runs differ in {key} ({first[key]} vs {other['meta'][key]})")


def seed_summary(results: list[dict], source: str = "bundled-test") -> str:
    """Runs that differ only in their calibration seed as one Markdown table: per (model, scheme, method) the mean
    ± sd over seeds of ``source``'s perplexity and KL, and the share of eacmoe-gptq's gap to FP each method closes,
    ``(ppl_eacmoe-gptq - ppl) / (ppl_eacmoe-gptq - ppl_FP)`` paired by seed (the qesc_experiments measure)."""
    _check_comparable(results, ignore=("seed",))
    seeds = [r["meta"]["seed"] for r in results]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: --seed-summary: each run needs its own seed (got {seeds})")
    found: dict[tuple, dict[int, dict]] = {}   # (model, scheme, method) -> seed -> that run's metrics
    for result, seed in zip(results, seeds):
        for row in result["rows"]:
            if not row.get("error") and source in (row.get("eval") or {}):
                found.setdefault((row["model"], row["scheme"], row["method"]), {})[seed] = row["eval"][source]

    def spread(values: list[float], digits: int) -> str:
        if len(values) < 2:
            return f"{values[0]:.{digits}f}" if values else "-"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    lines = [f"Over calibration seeds {', '.join(map(str, seeds))} (`{source}`; gap closed = share of eacmoe-gptq's "
             "perplexity gap to FP, paired by seed):", "",
             "| model | scheme | method | seeds | ppl | KL x1e3 | gap closed % |", "|---|---|---|---:|---:|---:|---:|"]
    for (model, scheme, method), by_seed in found.items():
        fp, ref = found.get((model, scheme, "fp"), {}), found.get((model, scheme, REFERENCE_METHOD), {})
        paired = [s for s in by_seed if s in fp and s in ref and ref[s]["ppl"] != fp[s]["ppl"]]
        closed = [100 * (ref[s]["ppl"] - by_seed[s]["ppl"]) / (ref[s]["ppl"] - fp[s]["ppl"]) for s in paired]
        lines.append(f"| {model} | {scheme} | {method} | {len(by_seed)} | "
                     f"{spread([m['ppl'] for m in by_seed.values()], 2)} | "
                     f"{spread([1e3 * m['kl'] for m in by_seed.values()], 1)} | "
                     f"{'-' if method == 'fp' else spread(closed, 1)} |")
    return "\n".join(lines)


def merge_results(results: list[dict]) -> dict:
    """Several runs' results as one: rows concatenated (their ratios recomputed against the merged rows, so a
    peer run on its own gets its ratio to eacmoe's run), sources and versions united, every command kept (the
    settings that make rows comparable, calibration and held-out windows, must agree)."""
    _check_comparable(results)
    first = results[0]["meta"]
    meta = {**first, "command": "; ".join(f"`{r['meta']['command']}`" for r in results).strip("`"),
            "machine": "; ".join(dict.fromkeys(r["meta"]["machine"] for r in results)),
            "versions": {k: v for r in results for k, v in r["meta"]["versions"].items()}}
    sources = list(dict.fromkeys(s for r in results for s in r["sources"]))
    return {"meta": meta, "sources": sources, "rows": add_ratios([row for r in results for row in r["rows"]])}


def write_markdown(path: Path, result: dict) -> None:
    rows, sources = result["rows"], result["sources"]
    meta = result["meta"]
    text = [
        f"Produced by `{meta['command']}` ({meta['threads']} torch thread(s) per child; GPTQMODEL_CPU_WORKERS="
        f"{meta['gptqmodel_cpu_workers']}). Calibration: {meta['nsamples']} x {meta['seqlen']} tokens of "
        f"`{meta['calib']}` (seed {meta['seed']}), the same tokens for every method. Held-out: {meta['eval_samples']} "
        f"windows of {meta['eval_seqlen']} tokens per source, float32, each export loaded by its own loader. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}. "
        f"Machine: {meta['machine']}; {meta['repeats']} run(s) per method, median wall time (min-max).",
        "",
        markdown_table(rows, sources),
        "",
        "- *wall s*: the whole child process (imports, load, calibration forwards, quantization, export); *CPU s*: its "
        "user + system time (all its threads); *peak RSS*: its ru_maxrss. *x*: the ratio to `eacmoe-gptq` of the "
        "same model and scheme in this run (median of the runs).",
        "- *ppl / KL*: perplexity of the quantized model and its mean KL(FP || quantized) per token on the same "
        "held-out windows (FP perplexities are in the `fp` rows).",
        "",
        settings_table(rows),
    ]
    path.write_text("\n".join(text) + "\n")


# ------------------------------------------------------------------------------------------------ workers
def _calibration_rows(calib_file: str):
    import torch

    ids = torch.load(calib_file)
    return [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]


def worker_prepare(args) -> None:
    """Calibration and held-out tokens, from eacmoe's own functions (the same ones `eacmoe.quantize` calls)."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from eacmoe.calibration import get_calibration_data
    from eacmoe.heldout import heldout_sequences

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    calib = get_calibration_data(args.calib, tok, args.nsamples, args.seqlen, seed=args.seed)
    torch.save(calib, args.calib_file)
    heldout, skipped = {}, {}
    for source in HELDOUT_SOURCES:
        try:
            ids = heldout_sequences(source, tok, args.eval_samples, args.eval_seqlen)
        except ValueError as exc:
            skipped[source] = str(exc)
            continue
        if ids is None:
            skipped[source] = "not readable here"
        else:
            heldout[source] = ids
    torch.save(heldout, args.heldout_file)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        versions["gptqmodel"] = version("gptqmodel")
    except Exception:  # not installed: its rows will fail and say so
        versions["gptqmodel"] = "not installed"
    Path(args.out_json).write_text(json.dumps({"versions": versions, "skipped_sources": skipped,
                                               "calib_shape": list(calib.shape)}))


def worker_gptqmodel(args) -> None:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    torch.set_num_threads(args.threads)
    out_dir, calib_file = Path(args.out_dir).resolve(), Path(args.calib_file).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.chdir(out_dir.parent)  # GPTQModel writes logs/ into the working directory: keep it beside the export
    args.out_dir, args.calib_file = str(out_dir), str(calib_file)
    layer_bits = None
    if args.paper_schedule:  # EAC-MoE's 2.5: eacmoe's own rule for the per-layer widths
        from eacmoe.schedule import parse_expert_bits
        from transformers import AutoConfig

        layer_bits = parse_expert_bits("2.5", AutoConfig.from_pretrained(args.model_dir).num_hidden_layers)
    dynamic = gptqmodel_dynamic(args.attn_bits, layer_bits, args.bits)
    dynamic = {"dynamic": dynamic} if dynamic else {}
    if args.preset == "default":
        qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, **dynamic)
        batch = 1
    else:
        qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=False, desc_act=False,
                              act_group_aware=False, damp_percent=args.damp, offload_to_disk=False, **dynamic)
        batch = 8
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)  # None: GPTQModel's auto (bf16)
    model = GPTQModel.load(args.model_dir, qcfg, device="cpu", **({"dtype": dtype} if dtype else {}))
    t0 = time.perf_counter()
    model.quantize(_calibration_rows(args.calib_file), batch_size=batch)
    quantize_seconds = time.perf_counter() - t0
    model.save(args.out_dir)
    settings = {k: getattr(qcfg, k, None) for k in ("bits", "group_size", "sym", "desc_act", "act_group_aware",
                                                    "damp_percent", "offload_to_disk")}
    settings["fallback"] = str(getattr(qcfg, "fallback", None))
    (Path(args.out_dir) / "bench_peers.json").write_text(json.dumps(
        {"quantize_seconds": quantize_seconds, "settings": settings, "batch_size": batch}, default=str))


def _drop_unimportable_transformers_aliases() -> None:
    """Work around a transformers 5.17 bug that stops llm-compressor on Qwen-MoE here: with a patch mapping
    registered (llm-compressor's `load_quantizable_moe` registers one for qwen2_moe / qwen3_moe), `apply_patches`
    calls dir() on every transformers module in sys.modules outside its try; the legacy alias module
    `transformers.image_processing_utils_fast` then imports the image-processing backends, which need
    torchvision (PyPI's torchvision does not import beside the CPU torch 2.13.0 wheel). Alias modules (no
    __file__) whose target does not import are dropped from sys.modules first: they are legacy import paths that
    no language model uses."""
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers.") and getattr(module, "__file__", "") is None:
            try:
                dir(module)
            except ImportError:
                del sys.modules[name]


def worker_llmcompressor(args) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import load_quantizable_moe
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.paper_schedule:
        raise SystemExit("bench_peers: the llm-compressor rows support uniform expert bits only (no 2.5 schedule)")
    torch.set_num_threads(args.threads)
    ids = torch.load(args.calib_file)
    _drop_unimportable_transformers_aliases()
    with load_quantizable_moe():  # its documented way to load an MoE for calibration (per-expert Linear)
        # float32 like the evaluation of the bundled models; a real-shape slice in its checkpoint's dtype (bf16),
        # as GPTQModel and eacmoe load it
        dtype = "auto" if is_real_shape_slice(args.model_dir) else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    def weights(bits: int) -> dict:
        return {"num_bits": bits, "type": "int", "symmetric": False,
                "strategy": "group" if args.group_size > 0 else "channel",
                "group_size": args.group_size if args.group_size > 0 else None}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights(args.bits)}}
    if args.attn_bits is not None:  # two disjoint groups: attention, and every MLP / expert Linear
        groups = {"attention": {"targets": [f"re:{ATTENTION_PATTERN}"], "weights": weights(args.attn_bits)},
                  "mlp": {"targets": [r"re:.*\.mlp\..*"], "weights": weights(args.bits)}}
    recipe = GPTQModifier(config_groups=groups,
                          ignore=["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"],
                          dampening_frac=args.damp, block_size=128, actorder=None)  # its default: static
    t0 = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], tokenizer=tok)
    quantize_seconds = time.perf_counter() - t0
    model.save_pretrained(args.out_dir, save_compressed=True)
    tok.save_pretrained(args.out_dir)
    import llmcompressor

    (Path(args.out_dir) / "bench_peers.json").write_text(json.dumps(
        {"quantize_seconds": quantize_seconds, "versions": {"llmcompressor": llmcompressor.__version__,
                                                            "torch": torch.__version__}}))


def _load_quantized(loader: str, path: str):
    import torch
    from transformers import AutoModelForCausalLM

    if loader == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        # its CPU kernel builds in fp16; the model is then cast to float32 (as tests/test_gptq_export_gptqmodel.py)
        return GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model.to(torch.float32)
    if loader == "eacmoe":
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    if loader == "compressed-tensors":
        return _load_compressed_tensors(path)
    raise ValueError(f"unknown loader {loader!r}")


LOAD_NOTES: list[str] = []


def _load_compressed_tensors(path: str):
    """llm-compressor's export in float32: transformers' compressed-tensors loader inside llm-compressor's
    ``load_quantizable_moe`` (per-expert Linear experts, as its export is keyed). llm-compressor 0.14 has no such
    load mapping for some families (Mixtral): transformers then leaves every expert tensor missing (random). Then the
    same steps as transformers' CompressedTensorsHfQuantizer are done by hand on the linearized model:
    apply_quantization_config, compress_model, load the checkpoint's tensors (the family's own key renaming, e.g.
    ``block_sparse_moe`` -> ``mlp``), decompress_model; every tensor of the model must come from the checkpoint."""
    import glob

    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from llmcompressor.modeling.moe.conversion_mappings import has_linearize_load_mappings
    from llmcompressor.modeling.moe.linearize import linearize_moe, load_quantizable_moe
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    if has_linearize_load_mappings(model_type):
        _drop_unimportable_transformers_aliases()
        with load_quantizable_moe():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        LOAD_NOTES.append("transformers' compressed-tensors loader in load_quantizable_moe")
        return model
    LOAD_NOTES.append(f"llm-compressor has no linearized load mapping for {model_type}: compressed-tensors' "
                      "compress/decompress steps applied by hand to its linearized model")
    config = AutoConfig.from_pretrained(path)
    config.quantization_config = None  # the structure only; its tensors all come from the checkpoint below
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    linearize_moe(model)
    qconfig = QuantizationConfig.model_validate(json.loads((Path(path) / "config.json").read_text())
                                                ["quantization_config"])
    apply_quantization_config(model, qconfig)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(model)
    state = {}
    for file in sorted(glob.glob(str(Path(path) / "*.safetensors"))):
        for key, value in load_file(file).items():
            state[re.sub(r"\.block_sparse_moe\.", ".mlp.", key)] = value
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"llm-compressor export does not match its model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=True)
    compressor.decompress_model(model)
    return model.to(torch.float32)


def worker_evaluate(args) -> None:
    """ppl and KL(FP || quantized) of an export on the held-out windows, FP first (before any peer import)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    heldout = torch.load(args.heldout_file)
    batch = 8

    def logprobs(model, ids):
        with torch.no_grad():
            return model(ids).logits[:, :-1].float().log_softmax(-1).flatten(0, 1)

    fp = AutoModelForCausalLM.from_pretrained(args.fp_model, dtype=torch.float32).eval()
    if hasattr(fp, "set_experts_implementation"):
        fp.set_experts_implementation("eager")
    reference = {s: [logprobs(fp, ids[i:i + batch]) for i in range(0, len(ids), batch)] for s, ids in heldout.items()}
    fp_nll = {s: sum(-lp.gather(1, ids[i * batch:(i + 1) * batch, 1:].reshape(-1, 1)).sum().item()
                     for i, lp in enumerate(parts)) for s, (parts, ids) in
              ((s, (reference[s], heldout[s])) for s in heldout)}
    del fp
    t0 = time.perf_counter()
    model = _load_quantized(args.loader, args.q_model).eval()
    load_seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"load_seconds": load_seconds, "eval": {}, "fp": {}, "load_notes": LOAD_NOTES}
    for source, ids in heldout.items():
        nll = kl = 0.0
        count = 0
        for index, start in enumerate(range(0, len(ids), batch)):
            chunk = ids[start:start + batch]
            q = logprobs(model, chunk)
            p = reference[source][index]
            targets = chunk[:, 1:].reshape(-1)
            nll += F.nll_loss(q, targets, reduction="sum").item()
            kl += (p.exp() * (p - q)).sum().item()
            count += targets.numel()
        result["eval"][source] = {"ppl": float(torch.tensor(nll / count).exp()), "kl": kl / count, "tokens": count}
        result["fp"][source] = {"ppl": float(torch.tensor(fp_nll[source] / count).exp()), "kl": 0.0, "tokens": count}
    if args.suite:
        sys.path.insert(0, str(REPO / "eval"))
        import run_suite  # noqa: PLC0415 - eval/ is not a package
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.fp_model)
        result["suite"] = run_suite.summarize(run_suite.evaluate_model_object(
            model, tok, limit=args.suite_limit))
    Path(args.out_json).write_text(json.dumps(result))


WORKERS = {"prepare": worker_prepare, "gptqmodel": worker_gptqmodel, "llmcompressor": worker_llmcompressor,
           "evaluate": worker_evaluate}


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    rows: list[dict] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


def _resolve_model(name: str) -> str:
    bundled = REPO / "eacmoe" / "assets" / "models" / name
    if bundled.is_dir():
        return str(bundled)
    if Path(name).is_dir():
        return str(Path(name).resolve())
    raise SystemExit(f"error: --models: {name!r} is neither a bundled model nor a directory")


def _worker_command(mode: str, **kwargs: Any) -> list[str]:
    command = [sys.executable, str(SCRIPT), "--worker", mode]
    for key, value in kwargs.items():
        if value is True:
            command.append("--" + key.replace("_", "-"))
        elif value not in (None, False):
            command += ["--" + key.replace("_", "-"), str(value)]
    return command


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _quantize_once(bench: Bench, method: Method, job: Job, base: Path, repeat: int) -> dict:
    job.out_dir = str(base / f"{method.name}-{repeat}")
    record = base / f"{method.name}-{repeat}.run.json"
    command = method.command(job)
    if bench.args.reuse_runs:
        recorded = _read_json(record)
        if recorded.get("command") == shlex.join(command) and recorded.get("returncode") == 0:
            log.info("%s %s %s run %d: reusing the recorded run %s", job.model, job.scheme.name, method.name,
                     repeat + 1, record)
            return recorded
    shutil.rmtree(job.out_dir, ignore_errors=True)
    log.info("%s %s %s run %d: %s", job.model, job.scheme.name, method.name, repeat + 1, shlex.join(command))
    result = run_measured(command, base / f"{method.name}-{repeat}.log", child_env(job.threads), bench.args.timeout)
    info = _read_json(Path(job.out_dir) / "bench_peers.json")
    report = _read_json(Path(job.out_dir) / "report.json")
    quantize_seconds = info.get("quantize_seconds") or (report.get("timings_seconds") or {}).get("quantize")
    for key, value in (info.get("versions") or {}).items():
        bench.versions[f"{key} (llm-compressor venv)" if key == "torch" else key] = value
    log.info("  rc %d, %.1f s wall, %.1f s CPU, peak %.2f GB", result.returncode, result.seconds,
             result.cpu_seconds, result.peak_rss_bytes / 1e9)
    run = {"returncode": result.returncode, "seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
           "peak_rss_bytes": result.peak_rss_bytes, "quantize_seconds": quantize_seconds,
           "command": shlex.join(command)}
    if result.returncode != 0:
        run["error"] = error_line(result.log_tail)
    record.write_text(json.dumps(run) + "\n")
    return run


def _evaluate(bench: Bench, method: Method, job: Job, base: Path, model_dir: str, heldout_file: Path) -> dict:
    args = bench.args
    ev_json = base / f"{method.name}-eval.json"
    command = [method.python(job), *_worker_command(
        "evaluate", fp_model=model_dir, q_model=base / f"{method.name}-0", loader=method.loader,
        heldout_file=heldout_file, out_json=ev_json, threads=job.threads,
        suite=args.suite and method.loader != "compressed-tensors", suite_limit=args.suite_limit)[1:]]
    ev = run_measured(command, base / f"{method.name}-eval.log", child_env(job.threads), args.timeout)
    if ev.returncode != 0:
        log.warning("  evaluation of %s failed: %s", method.name, error_line(ev.log_tail))
        return {"eval_error": error_line(ev.log_tail)}
    evaluated = _read_json(ev_json)
    return {"eval": evaluated["eval"], "fp_eval": evaluated["fp"], "eval_load_seconds": evaluated["load_seconds"],
            "load_notes": evaluated.get("load_notes"), "suite": evaluated.get("suite")}


SLICE_NOTE = "real-shape slice: synthetic weights, cost only (scripts/make_real_shape_slice.py)"


def model_dtype(model_dir: str) -> str:
    """The dtype the matched methods run a model in: eacmoe's CPU default (float32) for the bundled models; a
    real-shape slice in its checkpoint's bfloat16, as GPTQModel (its CPU auto dtype) and llm-compressor load it."""
    return "bfloat16" if is_real_shape_slice(model_dir) else "float32"


def is_real_shape_slice(model_dir: str) -> bool:
    """A checkpoint written by scripts/make_real_shape_slice.py (it leaves slice.json beside the weights)."""
    return (Path(model_dir) / "slice.json").is_file()


def bench_model(bench: Bench, model: str, scheme: Scheme) -> None:
    """Every method on one model and scheme: the repeats interleaved (run 1 of each method, then run 2 ...), so
    that a change in the machine's load shifts all methods alike; then one evaluation per method."""
    args, threads = bench.args, bench.args.threads
    model_dir = _resolve_model(model)
    base = bench.work / f"{Path(model).name}-{scheme.name}"
    base.mkdir(parents=True, exist_ok=True)
    calib_file, heldout_file, prep_json = base / "calib.pt", base / "heldout.pt", base / "prepare.json"
    prep = run_measured(_worker_command("prepare", model_dir=model_dir, calib=args.calib, nsamples=args.nsamples,
                                        seqlen=args.seqlen, seed=args.seed, eval_samples=args.eval_samples,
                                        eval_seqlen=args.eval_seqlen, calib_file=calib_file,
                                        heldout_file=heldout_file, out_json=prep_json),
                        base / "prepare.log", child_env(threads))
    if prep.returncode != 0:
        raise SystemExit(f"error: preparing {model}: {error_line(prep.log_tail)}")
    prepared = _read_json(prep_json)
    bench.versions.update(prepared["versions"])
    for source in HELDOUT_SOURCES:
        if source not in prepared["skipped_sources"] and source not in bench.sources:
            bench.sources.append(source)
    jobs: dict[str, Job] = {}
    rows: dict[str, dict] = {}
    for name in args.methods:
        method = METHODS[name]
        llmc_python, llmc_error = "", None
        if method.loader == "compressed-tensors":
            llmc_python, llmc_error = ensure_llmc_venv(Path(args.llmc_venv), bench.work / "llmc-venv.log")
        jobs[name] = Job(model=Path(model).name, model_dir=model_dir, scheme=scheme, calib_file=str(calib_file),
                         out_dir="", threads=threads, nsamples=args.nsamples, seqlen=args.seqlen, calib=args.calib,
                         seed=args.seed, damp_percent=args.damp, llmc_python=llmc_python or "")
        rows[name] = {"model": Path(model).name, "scheme": scheme.name,
                      "bits": 2.5 if scheme.paper_schedule else scheme.bits, "group_size": scheme.group_size,
                      "method": name, "settings": method.settings(jobs[name]), "runs": []}
        if llmc_error:
            rows[name]["error"] = f"cannot install llm-compressor: {llmc_error}"
    for repeat in range(args.repeats):
        for name in args.methods:
            row = rows[name]
            if "error" in row:
                continue
            run = _quantize_once(bench, METHODS[name], jobs[name], base, repeat)
            row["runs"].append(run)
            if "error" in run:
                row["error"] = run["error"]
                log.warning("  %s failed: %s", name, run["error"])
    fp_row: dict[str, Any] | None = None
    done = [name for name in args.methods if "error" not in rows[name]]
    if is_real_shape_slice(model_dir):  # random weights: perplexities would mean nothing, the row is cost only
        evaluated = {name: {"eval_skipped": SLICE_NOTE} for name in done}
    else:
        with ThreadPoolExecutor(max_workers=args.eval_jobs) as pool:  # evaluations measure no time: may overlap
            evaluated = dict(zip(done, pool.map(
                lambda name: _evaluate(bench, METHODS[name], jobs[name], base, model_dir, heldout_file), done)))
    for name in done:
        row = rows[name]
        row.update(summarize_runs(row["runs"]))
        row.update(evaluated[name])
        if fp_row is None and row.get("fp_eval"):
            fp_row = {"model": row["model"], "scheme": scheme.name, "method": "fp", "settings": "no quantization",
                      "eval": row["fp_eval"]}
    if fp_row is not None:
        bench.rows.append(fp_row)
    bench.rows.extend(rows.values())


def measure_baselines(args) -> list[tuple[str, Measured]]:
    """Peak RSS and CPU of each method's stack doing nothing but import itself and load the first model in fp32:
    the floor under every peak of the table."""
    model_dir = _resolve_model(args.models[0])
    load = (f"import torch; from transformers import AutoModelForCausalLM as A; "
            f"A.from_pretrained({model_dir!r}, dtype=torch.float32)")
    cases = [("eacmoe (main venv)", sys.executable, "import eacmoe.quantize"),
             ("gptqmodel (main venv)", sys.executable, "import gptqmodel")]
    llmc_python, llmc_error = ensure_llmc_venv(Path(args.llmc_venv), Path(args.work_dir) / "llmc-venv.log")
    if llmc_python:
        cases.append(("llmcompressor (its venv)", llmc_python, "import llmcompressor"))
    else:
        log.warning("llm-compressor baseline skipped: %s", llmc_error)
    out = []
    for label, python, imports in cases:
        out.append((label, run_measured([python, "-c", f"{imports}; {load}"],
                                        Path(args.work_dir) / f"baseline-{len(out)}.log", child_env(args.threads))))
    return out


def machine_line(threads: int) -> str:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return f"{os.cpu_count()} CPU cores, load average {load:.2f} at the start, {threads} thread(s) per child"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/bench_peers.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen-moe"],
                   help="bundled model names or model directories (any Mixtral/Qwen-MoE checkpoint)")
    p.add_argument("--schemes", nargs="+", type=parse_scheme, default=[parse_scheme("w2g64"), parse_scheme("w4g64")],
                   help="wBgG: B bits for experts and attention, group size G (-1 = per channel); wBaAgG: "
                        "attention A bits (e.g. w2a4g128: the paper's 2-bit experts with 4-bit attention; "
                        "w2.5a4g128: experts on the paper's 2.5 schedule)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="methods, in run order")
    p.add_argument("--calib", default="bundled", help="calibration text (eacmoe.calibration source)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--damp", type=float, default=0.01, help="damping of the matched runs (eacmoe's, fixed there)")
    p.add_argument("--eval-samples", type=int, default=32, help="held-out windows per source")
    p.add_argument("--eval-seqlen", type=int, default=256, help="tokens per held-out window")
    p.add_argument("--repeats", type=int, default=2, help="quantization runs per method (timing spread)")
    add_threads_argument(p)  # of every child
    p.add_argument("--eval-jobs", type=int, default=1,
                   help="evaluations run at once (they are not timed; the quantization runs always run alone)")
    p.add_argument("--reuse-runs", action="store_true",
                   help="keep a method's recorded run (<work-dir>/.../<method>-<n>.run.json, same command, "
                        "succeeded) instead of quantizing again; the table then shows the recorded time and peak")
    p.add_argument("--suite", action="store_true", help="also run the lm-eval suite on each export (slow)")
    p.add_argument("--suite-limit", type=float, default=None, help="lm-eval --limit for --suite")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a child is killed (its row fails)")
    p.add_argument("--llmc-venv", default=str(LLMC_VENV), help="llm-compressor's virtual environment (made if absent)")
    p.add_argument("--work-dir", default="/tmp/bench_peers", help="exports and logs (outside the repository)")
    p.add_argument("--json", default=None, help="write every row and the settings as JSON here")
    p.add_argument("--markdown", default=None, help="write the table as Markdown here")
    p.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                   help="measure nothing: merge these --json results (e.g. one run per model) into --markdown / --json")
    p.add_argument("--seed-summary", action="store_true",
                   help="with --from-json runs that differ only in --seed: one table of mean ± sd over the seeds and "
                        "the share of eacmoe-gptq's gap to FP each method closes, paired by seed (to --markdown)")
    p.add_argument("--baselines", action="store_true",
                   help="measure nothing else: the peak RSS of each stack importing itself and loading the first "
                        "--models model in fp32 (the floor under the table's peaks)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # internal: the child modes
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    for flag in ("--model-dir", "--calib-file", "--heldout-file", "--out-json", "--out-dir", "--preset",
                 "--fp-model", "--q-model", "--loader"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    p.add_argument("--bits", type=int, help=argparse.SUPPRESS)
    p.add_argument("--attn-bits", type=int, help=argparse.SUPPRESS)
    p.add_argument("--paper-schedule", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--group-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    if args.worker:
        WORKERS[args.worker](args)
        return 0
    if args.from_json and args.seed_summary:
        table = seed_summary([json.loads(Path(f).read_text()) for f in args.from_json])
        if args.markdown:
            Path(args.markdown).write_text(table + "\n")
        print(table)
        return 0
    if args.from_json:
        result = merge_results([json.loads(Path(f).read_text()) for f in args.from_json])
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
        if args.markdown:
            write_markdown(Path(args.markdown), result)
        print(markdown_table(result["rows"], result["sources"]))
        return 0
    if args.baselines:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        print("| stack | import + load peak RSS GB | CPU s |\n|---|---:|---:|")
        for label, m in measure_baselines(args):
            print(f"| {label} | {m.peak_rss_bytes / 1e9:.2f} | {m.cpu_seconds:.1f} |" if m.returncode == 0 else
                  f"| {label} | failed: {error_line(m.log_tail)} | - |")
        return 0
    for flag in ("nsamples", "seqlen", "eval_samples", "eval_seqlen", "repeats", "threads", "eval_jobs"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    bench = Bench(args, Path(args.work_dir))
    bench.work.mkdir(parents=True, exist_ok=True)
    machine = machine_line(args.threads)
    command = shlex.join(["python", "scripts/bench_peers.py", *argv])

    def write() -> None:  # after every model and scheme, so that an interrupted run keeps what it measured
        add_ratios(bench.rows)
        result = {"meta": {"command": command, "threads": args.threads, "machine": machine,
                           "gptqmodel_cpu_workers": child_env(args.threads)["GPTQMODEL_CPU_WORKERS"],
                           "calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                           "eval_samples": args.eval_samples, "eval_seqlen": args.eval_seqlen,
                           "repeats": args.repeats, "damp": args.damp, "versions": bench.versions},
                  "sources": bench.sources, "rows": bench.rows}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
        if args.markdown:
            write_markdown(Path(args.markdown), result)

    for scheme in args.schemes:
        for model in args.models:
            bench_model(bench, model, scheme)
            write()
    print(markdown_table(bench.rows, bench.sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
