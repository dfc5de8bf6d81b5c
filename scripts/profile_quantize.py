"""Where the CPU time of `python -m eacmoe.quantize` goes, stage by stage (cProfile on CPU time, not wall time).

    python scripts/profile_quantize.py --threads 1 --markdown /tmp/profile.md -- \\
        --model tiny-mixtral --method gptq --bits 2 --attn-bits 2 --group-size 64 --nsamples 128 --seqlen 256

Everything after ``--`` is handed to ``eacmoe.quantize`` (``--threads``, ``--out`` and ``--overwrite`` are added;
``--eval-samples 1 --eval-seqlen 16`` too unless given, so that the CLI's own closing evaluation is small, as in
scripts/bench_peers.py). The run happens in a child process under ``cProfile.Profile(time.process_time)``: CPU
seconds of this process, so that other jobs on a shared machine do not inflate a stage (cProfile's own overhead
does, most for the stages that make many small Python calls: the GPTQ column loop and the per-expert loop). The
stages are read from the profile's per-function cumulative times, split by caller where a function serves two
stages (``GPTQ.add_batch`` from the attention hooks and from the expert loop).
"""
from __future__ import annotations

import argparse
import json
import os
import pstats
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from eacmoe.threads import add_threads_argument  # noqa: E402

CHILD = """
import cProfile, runpy, sys, time
out, argv = sys.argv[1], sys.argv[2:]
sys.argv = ["eacmoe.quantize", *argv]
profile = cProfile.Profile(time.process_time)
try:
    profile.runcall(runpy.run_module, "eacmoe.quantize", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    if exc.code not in (None, 0):
        raise
finally:
    profile.dump_stats(out)
"""


def _key(stats: pstats.Stats, path_suffix: str, name: str) -> tuple | None:
    for key in stats.stats:
        if key[0].endswith(path_suffix) and key[2] == name:
            return key
    return None


def cumulative(stats: pstats.Stats, path_suffix: str, name: str) -> float:
    key = _key(stats, path_suffix, name)
    return stats.stats[key][3] if key else 0.0


def cumulative_from(stats: pstats.Stats, path_suffix: str, name: str, caller_suffix: str, caller: str) -> float:
    """Cumulative time of a function when called from one caller."""
    key = _key(stats, path_suffix, name)
    if key is None:
        return 0.0
    for caller_key, entry in stats.stats[key][4].items():
        if caller_key[0].endswith(caller_suffix) and caller_key[2] == caller:
            return entry[3]
    return 0.0


def stages(stats: pstats.Stats) -> list[tuple[str, float]]:
    """(stage, CPU seconds) covering the whole run."""
    c = lambda f, n: cumulative(stats, f, n)  # noqa: E731
    P, W, G = "eacmoe/pipeline.py", "eacmoe/workflow.py", "eacmoe/quant/gptq.py"
    total = stats.total_tt
    job = c(W, "_run_checked_job")
    run = c(P, "run")
    layers = c(P, "quantize_layer")
    evaluate = c("eacmoe/expert_shift.py", "measure_expert_shift")
    write = c(W, "write_checkpoint")
    # add_batch is wrapped by torch.no_grad: its caller in the profile is torch's decorate_context, which the hook and
    # the expert loop call for add_batch alone
    D = "torch/utils/_contextlib.py"
    hessian_hook = cumulative_from(stats, D, "decorate_context", P, "hook")
    hessian_experts = cumulative_from(stats, D, "decorate_context", P, "_quantize_routed_experts")
    matrix_experts = cumulative_from(stats, P, "_quantize_matrices", P, "_quantize_routed_experts")
    matrix_attention = cumulative_from(stats, P, "_quantize_matrices", P, "_quantize_linear_groups")
    solve = c(G, "quantize_together")
    factor = c(G, "_feedback_factor")
    collect = c(P, "collect_hessians")
    experts = c(P, "_quantize_routed_experts")
    router = c("eacmoe/router_calibration.py", "calibrate_router")
    advance = c(P, "run_layer") + c(P, "advance_from_block")
    capture = c(P, "capture_block_input")
    attention = c(P, "_quantize_linear_groups")
    rows = [
        ("startup: imports, argument checks", total - job),
        ("load model, calibration and held-out text, weight scan", job - run - evaluate - write),
        ("attention: calibration forwards to each Linear group", collect - hessian_hook),
        ("Hessians X^T X (GPTQ.add_batch), attention", hessian_hook),
        ("Hessians X^T X (GPTQ.add_batch), experts", hessian_experts),
        ("damped Cholesky (GPTQ._feedback_factor)", factor),
        ("GPTQ column loop + grids (quantize_together less the factorisation)", solve - factor),
        ("dequantize + bookkeeping of each matrix (_quantize_matrices less GPTQ)",
         matrix_experts + matrix_attention - solve),
        ("per-expert Python loop: routing masks, token gather, down-proj inputs",
         experts - hessian_experts - matrix_experts),
        ("block input capture (forward up to the post-attention norm; qesc: both streams)", capture),
        ("router calibration (QESC)", router),
        ("advance the stream(s): residual + block (qesc: also the FP one)", advance),
        ("rest of each layer (FP copy, routing, attention bookkeeping)",
         layers - attention - experts - capture - router - advance),
        ("progress checkpoint per layer (for --resume)", run - layers),
        ("closing evaluation of the CLI (1 window x 16 tokens)", evaluate),
        ("export: packing + writing", write),
    ]
    return rows


def markdown(rows: list[tuple[str, float]], total: float, title: str) -> str:
    lines = [title, "", "| stage | CPU s | share |", "|---|---:|---:|"]
    for label, seconds in rows:
        lines.append(f"| {label} | {seconds:.2f} | {100 * seconds / total:.1f}% |")
    lines.append(f"| **total (profiled)** | **{total:.2f}** | 100% |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, _, forwarded = (argv[: argv.index("--")], None, argv[argv.index("--") + 1:]) if "--" in argv else (argv, None, [])
    p = argparse.ArgumentParser(prog="python scripts/profile_quantize.py", description=__doc__.split("\n\n")[0])
    add_threads_argument(p)  # of the profiled run
    p.add_argument("--markdown", default=None, help="append the stage table to this file")
    p.add_argument("--json", default=None, help="write the stages as JSON here")
    p.add_argument("--stats", default=None, help="keep the raw cProfile stats here (default: a temporary file)")
    args = p.parse_args(ours)
    if not forwarded:
        p.error("give the eacmoe.quantize arguments after --")
    work = Path(tempfile.mkdtemp(prefix="profile_quantize-"))
    stats_path = Path(args.stats) if args.stats else work / "quantize.prof"
    quantize_argv = [*forwarded, "--threads", str(args.threads), "--out", str(work / "out"), "--overwrite"]
    if "--eval-samples" not in forwarded:
        quantize_argv += ["--eval-samples", "1", "--eval-seqlen", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(stats_path), *quantize_argv], env=env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"error: the profiled run failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 2
    stats = pstats.Stats(str(stats_path))
    rows = stages(stats)
    command = shlex.join(["python", "scripts/profile_quantize.py", *argv])
    title = (f"`{command}` ({args.threads} torch thread(s); CPU seconds under cProfile, whose overhead inflates the "
             "Python-heavy stages)")
    table = markdown(rows, stats.total_tt, title)
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as out:
            out.write(table + "\n\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "threads": args.threads,
                                               "total_cpu_seconds": stats.total_tt,
                                               "stages": dict(rows)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
