"""Run the eacmoe evaluation suite on models and write one compact markdown table row per model.

Models given by directory or bundled name (``tiny-mixtral``, ``tiny-qwen-moe``, resolved with
``eacmoe.assets.resolve_model``) are evaluated through the real ``lm_eval`` CLI in a subprocess (offline,
``dtype=float32``); ``--unigram`` adds the unigram baseline (eval/unigram_baseline.py). In-memory models (e.g. a
freshly quantized one) go through ``evaluate_model_object`` instead.

    python eval/run_suite.py --models tiny-mixtral tiny-qwen-moe --unigram --threads 1 --out docs/baseline.md

``--threads`` sets the torch CPU threads of every evaluation (the lm_eval subprocesses read OMP_NUM_THREADS); the
written table ends with the command that produced it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EVAL_DIR = Path(__file__).resolve().parent
REPO_ROOT = EVAL_DIR.parent
TASKS_DIR = EVAL_DIR / "tasks"
for _path in (REPO_ROOT, EVAL_DIR):  # eacmoe from this checkout; unigram_baseline beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from eacmoe.assets import resolve_model  # noqa: E402
from eacmoe.export import is_packed_export  # noqa: E402
from eacmoe.threads import add_threads_argument, command_line, set_threads  # noqa: E402

log = logging.getLogger("eacmoe.eval.run_suite")

SUITE = "eacmoe_suite"
DOMAINS = ("sotu", "brown", "shakespeare", "pydoc")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------------------ running
def lm_eval_command(
    model_dir: str, tasks: str = SUITE, limit: float | None = None, batch_size: int = 1,
    experts_implementation: str | None = "eager", output_path: str | None = None,
) -> list[str]:
    """The ``lm_eval`` CLI call for one model directory (float32 on CPU, our tasks included). A packed eacmoe
    export gets ``trust_remote_code=True`` (its packed experts run their own loop)."""
    model_args = f"pretrained={model_dir},dtype=float32"
    if is_packed_export(model_dir):
        model_args += ",trust_remote_code=True"
    elif experts_implementation:  # transformers 5 MoE: the "eager" experts loop is 3-5x faster than grouped_mm on CPU
        model_args += f",experts_implementation={experts_implementation}"
    lm_eval_bin = Path(sys.executable).with_name("lm_eval")
    command = [str(lm_eval_bin) if lm_eval_bin.exists() else "lm_eval", "--model", "hf", "--model_args", model_args,
               "--include_path", str(TASKS_DIR), "--tasks", tasks, "--device", "cpu",
               "--batch_size", str(batch_size)]
    if limit is not None:
        command += ["--limit", f"{limit:g}"]
    if output_path is not None:
        command += ["--output_path", output_path]
    return command


def check_plain_checkpoint(model_dir: str) -> None:
    """Refuse GPTQ checkpoints: loaded with plain from_pretrained under transformers 5 their fused experts come up
    RANDOM and lm_eval still prints numbers (see REFERENCE.md). Evaluate the packed export (--format packed, run
    with trust_remote_code) or the in-memory model instead."""
    config_path = Path(model_dir) / "config.json"
    if config_path.exists() and "quantization_config" in json.loads(config_path.read_text()):
        raise ValueError(f"{model_dir} is a GPTQ-format quantized checkpoint; evaluate eacmoe's packed export "
                         "(trust_remote_code) or the in-memory model with evaluate_model_object() instead")


def evaluate_model_dir(
    model: str, tasks: str = SUITE, limit: float | None = None, batch_size: int = 1,
    experts_implementation: str | None = "eager", timeout_s: float | None = None,
) -> dict[str, Any]:
    """Evaluate a model directory (or bundled name) with the real lm_eval CLI; returns lm-eval's results JSON."""
    model_dir = resolve_model(model)
    check_plain_checkpoint(model_dir)
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory(prefix="eacmoe-eval-") as out_dir:
        command = lm_eval_command(model_dir, tasks, limit, batch_size, experts_implementation, out_dir)
        log.info("running: %s", " ".join(command))
        start = time.perf_counter()
        proc = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"lm_eval failed ({proc.returncode}) on {model_dir}:\n{proc.stderr[-4000:]}")
        result_files = sorted(Path(out_dir).rglob("results_*.json"))
        if not result_files:
            raise RuntimeError(f"lm_eval wrote no results for {model_dir}:\n{proc.stderr[-4000:]}")
        results = json.loads(result_files[-1].read_text())
    log.info("%s: %.0f s", model, time.perf_counter() - start)
    return results


def evaluate_model_object(
    model, tokenizer, tasks: Sequence[str] = (SUITE,), limit: float | None = None, batch_size: int = 1
) -> dict[str, Any]:
    """Evaluate an in-memory model (e.g. quantized) on the suite with ``HFLM(pretrained=model)``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=str(TASKS_DIR)),
                           limit=limit, log_samples=False)


# ------------------------------------------------------------------------------------------------ reporting
def summarize(results: dict[str, Any]) -> dict[str, float]:
    """Flat {metric name: value} of the headline numbers in an lm-eval results dict (missing tasks skipped)."""
    per_task = results["results"]
    summary: dict[str, float] = {}

    def take(task: str, metric: str, key: str) -> None:
        value = per_task.get(task, {}).get(f"{metric},none")
        if isinstance(value, (int, float)):
            summary[key] = float(value)

    take("eacmoe_wikitext2", "word_perplexity", "wikitext2_word_ppl")
    take("eacmoe_wikitext2", "bits_per_byte", "wikitext2_bpb")
    for domain in DOMAINS:
        take(f"eacmoe_ppl_{domain}", "word_perplexity", f"{domain}_word_ppl")
        take(f"eacmoe_ppl_{domain}", "bits_per_byte", f"{domain}_bpb")
    take("eacmoe_cloze", "acc", "cloze_acc")
    take("eacmoe_cloze", "acc_stderr", "cloze_acc_stderr")
    take("eacmoe_cloze", "perplexity", "cloze_ppl")
    take("eacmoe_nextsent", "acc", "nextsent_acc")
    take("eacmoe_nextsent", "acc_stderr", "nextsent_acc_stderr")
    take("eacmoe_nextsent", "acc_norm", "nextsent_acc_norm")
    take("eacmoe_nextsent", "acc_norm_stderr", "nextsent_acc_norm_stderr")
    return summary


TABLE_HEADER = (
    "| model | WT2 word ppl | sotu ppl / bpb | brown ppl / bpb | shakespeare ppl / bpb | pydoc ppl / bpb "
    "| cloze acc % | nextsent acc % | nextsent acc_norm % |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _ppl(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"


def _acc(summary: dict[str, float], key: str) -> str:
    if key not in summary:
        return "-"
    stderr = summary.get(f"{key}_stderr")
    return f"{100 * summary[key]:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def table_row(name: str, summary: dict[str, float]) -> str:
    """One markdown row: WikiText-2 word ppl, per-domain word ppl / bits per byte, cloze and nextsent accuracy."""
    cells = [name, _ppl(summary.get("wikitext2_word_ppl"))]
    for domain in DOMAINS:
        ppl, bpb = summary.get(f"{domain}_word_ppl"), summary.get(f"{domain}_bpb")
        cells.append("-" if ppl is None else f"{_ppl(ppl)} / {bpb:.3f}")
    cells += [_acc(summary, "cloze_acc"), _acc(summary, "nextsent_acc"), _acc(summary, "nextsent_acc_norm")]
    return "| " + " | ".join(cells) + " |"


def markdown_table(rows: Sequence[tuple[str, dict[str, float]]]) -> str:
    return "\n".join([TABLE_HEADER, *(table_row(name, summary) for name, summary in rows)])


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=[], help="model directories or bundled names")
    parser.add_argument("--unigram", action="store_true", help="add the unigram baseline row")
    parser.add_argument("--tasks", default=SUITE, help="task / group names for lm_eval (default: the suite)")
    parser.add_argument("--limit", type=float, default=None, help="items per task (testing only)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--experts-implementation", default="eager",
                        help="passed to from_pretrained for MoE models; 'none' to leave the default")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--json-out", type=Path, default=None, help="write the per-model summaries (JSON) here")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.models and not args.unigram:
        parser.error("nothing to evaluate: give --models and/or --unigram")
    threads = set_threads(args.threads)
    command = command_line("python eval/run_suite.py", sys.argv[1:] if argv is None else argv, threads)

    experts_impl = None if args.experts_implementation.lower() == "none" else args.experts_implementation
    rows: list[tuple[str, dict[str, float]]] = []
    timings: dict[str, float] = {}
    for model in args.models:
        start = time.perf_counter()
        results = evaluate_model_dir(model, args.tasks, args.limit, args.batch_size, experts_impl)
        timings[model] = time.perf_counter() - start
        rows.append((Path(model).name, summarize(results)))
        print(table_row(*rows[-1]), flush=True)
    if args.unigram:
        from unigram_baseline import run_unigram_suite

        start = time.perf_counter()
        rows.append(("unigram (add-1, train)", summarize(run_unigram_suite(args.tasks.split(","), args.limit))))
        timings["unigram"] = time.perf_counter() - start
        print(table_row(*rows[-1]), flush=True)

    table = markdown_table(rows)
    note = f"\n\nProduced by `{command}` ({threads} torch CPU thread(s))."
    if args.limit is not None:
        note += f"\n\n(--limit {args.limit:g}: smoke test, not real numbers)"
    print("\n" + table + note)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + note + "\n")
        log.info("wrote %s", args.out)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": command, "threads": threads, "limit": args.limit, "tasks": args.tasks,
                   "seconds": timings, "models": dict(rows)}
        args.json_out.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        log.info("wrote %s", args.json_out)


if __name__ == "__main__":
    main()
