"""The codecs themselves on a model's experts: how fast they move weights, and what their error looks like.

A sweep (:mod:`eacmoe.evaluation`) measures what SZ3 and ZFP do to accuracy; this study measures the two things a
user who offloads experts also needs, on the same expert matrices:

- **Throughput**: compress and decompress MB/s (of float32 weights) of each codec at each bound the sweep used
  (the searched ``bpw:b`` bounds, else the ``rel``/``abs`` bound of the cell), with one worker and with one worker
  per available core (:func:`~eacmoe.codecs.measure_throughput`; the codecs do not parallelise one call).
- **SZ3's real error against the study's Normal model**: the histogram of ``w - w'`` on one expert matrix at
  ``rel:p`` (arXiv 2509.07727's parameterisation) beside N(0, p x mean|w|) (:func:`~eacmoe.codecs.error_histogram`).

Results go to ``<out>/codecs.json`` (reused while the model's fingerprint, the bounds and the core count are the
same: timings are not re-measured on every report) and ``<out>/sz3_error.png``; :func:`report_lines` renders them
for the sweep's REPORT.md.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .codecs import available_cpus, error_histogram, measure_throughput, parse_bound, plot_error_histogram

__all__ = ["HISTOGRAM_FILE", "HISTOGRAM_P", "STUDY_FILE", "codec_bounds", "report_lines", "run_codec_study"]

log = logging.getLogger(__name__)

STUDY_FILE = "codecs.json"
HISTOGRAM_FILE = "sz3_error.png"
HISTOGRAM_P = 0.3  # the study's p = 30% of mean |w|
THROUGHPUT_REPEATS = 3


def codec_bounds(rows: Sequence[Mapping[str, Any]], codecs: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(codec, cell, bound)`` for every codec cell of a sweep: the searched bound of a ``bpw`` target, else the
    cell's own ``rel``/``abs`` bound. Sorted by codec, then by the cell's bits per weight."""
    found = []
    for row in rows:
        if row.get("method") not in codecs:
            continue
        bound = row.get("searched_bound") or str(row.get("target"))
        if parse_bound(bound).kind == "bpw":  # a bpw cell always records its searched bound; be safe anyway
            continue
        found.append((row["bits"]["bits_per_weight"], row["method"], row["cell"], bound))
    return [(codec, cell, bound) for _, codec, cell, bound in sorted(found, key=lambda f: (f[1], f[0]))]


def _histogram_matrix(matrices: Mapping[str, np.ndarray]) -> str:
    """The first expert matrix of the middle layer that has experts (a typical matrix, not an edge layer's)."""
    names = list(matrices)
    layers = sorted({int(n.split(".")[1]) for n in names if ".experts." in n})
    if not layers:
        return names[len(names) // 2]
    middle = layers[len(layers) // 2]
    return next(n for n in names if n.startswith(f"layers.{middle}.") and ".experts." in n)


def _load_cached(path: Path, key: dict) -> dict | None:
    try:
        study = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return study if study.get("key") == key else None


def run_codec_study(matrices: Mapping[str, np.ndarray], bounds: Sequence[tuple[str, str, str]], out: Path,
                    fingerprint: str, all_threads: int | None = None) -> dict:
    """Throughput of every ``(codec, cell, bound)`` at 1 and ``all_threads`` workers (default: every available
    core) over all ``matrices`` (float32, ``{name: [out, in]}``) and SZ3's error histogram; written to
    ``<out>/codecs.json`` and ``<out>/sz3_error.png``, and returned. The timings of a study already in ``out``
    with the same fingerprint, bounds and thread counts are kept (not measured again); the histogram, exact and
    cheap, is always drawn anew."""
    all_threads = all_threads or available_cpus()
    thread_counts = sorted({1, all_threads})
    key = {"fingerprint": fingerprint, "bounds": [list(b) for b in bounds], "threads": thread_counts,
           "histogram_p": HISTOGRAM_P}
    path = Path(out) / STUDY_FILE
    cached = _load_cached(path, key)
    mats = list(matrices.values())
    numel = sum(m.size for m in mats)
    throughput = cached["throughput"] if cached is not None else []  # timings are kept; the histogram is exact
    for codec, cell, bound in bounds if cached is None else ():
        for threads in thread_counts:
            log.info("codec throughput: %s at %s, %d worker(s)", codec, bound, threads)
            result = measure_throughput(codec, mats, bound, threads=threads, repeats=THROUGHPUT_REPEATS)
            throughput.append({"cell": cell, "bound": bound, **result.as_dict()})

    name = _histogram_matrix(matrices)
    hist = error_histogram(matrices[name], f"rel:{HISTOGRAM_P}", "sz3")
    plot_error_histogram(hist, Path(out) / HISTOGRAM_FILE,
                         title=f"SZ3 error on {name}\nat bound {HISTOGRAM_P} x mean|w|, against the Normal model")
    study = {
        "key": key, "numel": numel, "cpu_count": os.cpu_count() if cached is None else cached["cpu_count"],
        "throughput": throughput,
        "histogram": {"matrix": name, "p": HISTOGRAM_P, "abs_bound": hist.abs_bound, "mean_abs_w": hist.mean_abs_w,
                      "bits_per_weight": hist.bits_per_weight, "real_mean": hist.real_mean,
                      "real_std": hist.real_std, "real_max_abs": hist.real_max_abs,
                      "std_over_bound": hist.real_std / hist.abs_bound if hist.abs_bound else None},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(study, indent=1) + "\n")
    os.replace(tmp, path)
    return study


def report_lines(study: Mapping[str, Any]) -> list[str]:
    """The study as a Markdown section (throughput table, then the histogram and its figures)."""
    lines = ["## The codecs on these experts: throughput and error shape", ""]
    rows = study.get("throughput", [])
    if rows:
        lines += [
            f"Compress / decompress speed over all expert matrices ({study['numel'] / 1e6:.1f} M weights, float32: "
            f"{4 * study['numel'] / 1e6:.0f} MB), median of {THROUGHPUT_REPEATS} rounds after a warm-up. "
            "SZ3 and ZFP do not parallelise one call, so *workers* are processes compressing different matrices at "
            "once (what an offloading runtime would do); with several workers a round lasts as long as the slowest. "
            "Measured on a machine whose cores other jobs may have shared: compare rows of one run.", "",
            "| codec | cell | bound | bits/weight | workers | compress MB/s | decompress MB/s |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['codec']} | {r['cell']} | {r['bound']} | {r['bits_per_weight']:.3f} | {r['threads']} | "
                  f"{r['compress_mb_s']:.1f} | {r['decompress_mb_s']:.1f} |" for r in rows]
        lines.append("")
    h = study["histogram"]
    lines += [
        f"SZ3's real error on `{h['matrix']}` at bound {h['p']} x mean|w| = {h['abs_bound']:.3g} "
        f"({h['bits_per_weight']:.2f} bits per weight): mean {h['real_mean']:.2g}, std {h['real_std']:.3g} "
        f"(= {h['std_over_bound']:.3f} x bound; a uniform error on ±bound has 0.577), max |error| "
        f"{h['real_max_abs']:.3g}. The study's Normal model at the same nominal level, N(0, e) with e = bound, has "
        f"{1 / h['std_over_bound']:.2f}x that std and tails beyond the bound, which SZ3 never produces.", "",
        f"![SZ3 error against the Normal model]({HISTOGRAM_FILE})", ""]
    return lines
