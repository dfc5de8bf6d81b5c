"""Peak memory of a quantization run against the size of the model: lazy (layer-at-a-time) vs in-memory loading.

    python scripts/measure_memory.py --layers 6 12 --threads 1 --write docs/MEMORY.md

For each size it writes a synthetic random Mixtral-style MoE checkpoint (fp32 safetensors, sharded, legacy
per-expert keys as save_pretrained writes them) under --work-dir, runs `python -m eacmoe.quantize` on it in a
subprocess, once with --lazy and once with --no-lazy, and reads the subprocess's peak resident set size from
the kernel (``os.wait4`` rusage, ru_maxrss: includes mapped checkpoint pages, so nothing hides in mmap). A run of
the same command on a tiny model (one layer, hidden 64) gives the fixed baseline (Python, torch, transformers,
tokenizer, calibration text).

This process itself never imports torch and builds the checkpoints in a subprocess too: Linux carries a
process's peak RSS across fork+exec into the child's ru_maxrss, so a big parent would inflate every reading. The
synthetic
checkpoint and the outputs are deleted afterwards (they are never written inside the repository); the run logs
stay in --work-dir.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eacmoe.threads import add_threads_argument, command_line, set_threads  # noqa: E402  (does not import torch)

log = logging.getLogger("measure_memory")
SECTION_BEGIN, SECTION_END = "<!-- measure-memory:begin -->", "<!-- measure-memory:end -->"


@dataclass
class Measurement:
    label: str
    layers: int
    checkpoint_bytes: int
    layer_bytes: int
    peak_rss_bytes: int
    seconds: float


def build_checkpoint(directory: Path, layers: int, hidden: int, intermediate: int, experts: int, vocab: int,
                     seed: int) -> tuple[int, int]:
    """Write a random Mixtral-style MoE with save_pretrained; returns (checkpoint bytes, bytes of one layer)."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from eacmoe.assets import TOKENIZER_DIR
    from eacmoe.lazy_loading import checkpoint_bytes

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                           num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=4096)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(std=0.3)  # routing that varies across tokens, as in a trained model
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    model.save_pretrained(directory, max_shard_size="500MB")
    del model
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(directory)
    return checkpoint_bytes(directory), layer_bytes


def child_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def build_in_subprocess(directory: Path, layers: int, args) -> tuple[int, int]:
    """build_checkpoint run by a child process, so that this one stays small (see the module docstring)."""
    command = [sys.executable, __file__, "--build-into", str(directory), "--layers", str(layers),
               "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--experts", str(args.experts),
               "--vocab", str(args.vocab)]
    result = subprocess.run(command, capture_output=True, text=True, env=child_env(), cwd=REPO, check=True)
    sizes = json.loads(result.stdout.strip().splitlines()[-1])
    return sizes["checkpoint_bytes"], sizes["layer_bytes"]


def peak_rss_of(command: list[str], log_file: Path) -> tuple[int, float]:
    """Run `command`; its peak RSS in bytes (from the kernel's rusage of exactly that child) and wall seconds."""
    env = child_env()
    t0 = time.perf_counter()
    with open(log_file, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}; see {log_file}")
    return usage.ru_maxrss * 1024, seconds  # ru_maxrss is in KiB on Linux


def quantize_command(checkpoint: Path, out: Path, method: str, mode: str, args) -> list[str]:
    return [sys.executable, "-m", "eacmoe.quantize", "--model", str(checkpoint), "--out", str(out),
            "--method", method, "--bits", "2", "--group-size", "64", "--nsamples", str(args.nsamples),
            "--seqlen", str(args.seqlen), "--eval-samples", "2", "--eval-seqlen", "64", "--router-steps", "20",
            "--lazy" if mode == "lazy" else "--no-lazy"]


def write_report(path: Path, command: str, args, baseline: int, rows: list[Measurement]) -> None:
    gb = 1e9
    lines = [
        "## Peak memory vs model size (synthetic small Mixtral-style MoE)",
        "",
        "Generated by `scripts/measure_memory.py`; measured in one run with:",
        "",
        f"    {command}",
        "",
        "Synthetic random Mixtral-style MoE, fp32 safetensors (sharded, legacy per-expert keys): hidden "
        f"{args.hidden}, {args.experts} experts of intermediate size {args.intermediate}, vocab {args.vocab}. "
        f"Quantization: `--bits 2 --group-size 64 --router-steps 20 --nsamples {args.nsamples} --seqlen "
        f"{args.seqlen}` plus the final evaluation (`--eval-samples 2 --eval-seqlen 64`), CPU, float32, "
        f"{args.threads} torch thread(s) on {os.cpu_count()} cores (shared with other jobs, so times are only "
        "indicative). Peak RSS is the kernel's "
        "`ru_maxrss` of the quantization process (`os.wait4`), so mapped checkpoint pages count too.",
        "",
        "Baseline (the same quantization of a one-layer, hidden-64 model: Python, torch, transformers, tokenizer, "
        f"calibration text): {baseline / gb:.2f} GB.",
        "",
        "| run | layers | checkpoint | one layer | peak RSS | peak / checkpoint | (peak - baseline) / layer | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.label} | {r.layers} | {r.checkpoint_bytes / gb:.2f} GB | {r.layer_bytes / gb:.3f} GB | "
                     f"{r.peak_rss_bytes / gb:.2f} GB | {r.peak_rss_bytes / r.checkpoint_bytes:.2f} | "
                     f"{(r.peak_rss_bytes - baseline) / r.layer_bytes:.1f} | {r.seconds:.0f} s |")
    lines += [
        "",
        "Lazy runs (`--lazy`, automatic above 2 GiB) hold the model skeleton (embeddings, norm, head), the current",
        "decoder layer, its FP copy for the FP stream (QESC), the transient per-expert tensors while transformers",
        "fuses a layer's experts on load (and unfuses them on save), and the calibration activations: their peak",
        "depends on the size of one layer, not on the number of layers. In-memory runs (`--no-lazy`) hold the",
        "quantized model and a second full FP model for the evaluation, each read by `from_pretrained`.",
        "",
    ]
    text = "\n".join([SECTION_BEGIN, *lines, SECTION_END])
    current = path.read_text() if path.exists() else ""
    if SECTION_BEGIN in current and SECTION_END in current:  # the rest of the file (other sections) stays
        head, rest = current.split(SECTION_BEGIN, 1)
        text = head + text + rest.split(SECTION_END, 1)[1]
    path.write_text(text if text.endswith("\n") else text + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[6, 12], help="decoder layers of each synthetic model")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size")
    p.add_argument("--intermediate", type=int, default=1024, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=16, help="routed experts per layer")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary (the bundled tokenizer has 8192)")
    p.add_argument("--methods", nargs="+", default=["gptq"], choices=["rtn", "gptq", "qesc"],
                   help="quantization methods of the measured runs (qesc also holds an FP copy of the current layer)")
    p.add_argument("--nsamples", type=int, default=8, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sequence")
    p.add_argument("--modes", nargs="+", default=["lazy", "in-memory"], choices=["lazy", "in-memory"],
                   help="loading modes to measure")
    p.add_argument("--in-memory-max-layers", type=int, default=None,
                   help="skip in-memory runs of larger models (they need about twice the checkpoint in RAM)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/eacmoe-measure-memory"),
                   help="where the synthetic checkpoints and outputs go (deleted afterwards)")
    p.add_argument("--write", type=Path, default=None, help="write the results as markdown here (e.g. docs/MEMORY.md)")
    p.add_argument("--build-into", type=Path, default=None, help=argparse.SUPPRESS)  # internal: the builder child
    add_threads_argument(p)
    args = p.parse_args(argv)
    args.threads = set_threads(args.threads)  # torch threads of every child (OMP_NUM_THREADS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.build_into is not None:
        size, layer_bytes = build_checkpoint(args.build_into, args.layers[0], args.hidden, args.intermediate,
                                             args.experts, args.vocab, seed=0)
        print(json.dumps({"checkpoint_bytes": size, "layer_bytes": layer_bytes}))
        return 0
    given = argv if argv is not None else sys.argv[1:]
    command = command_line("python scripts/measure_memory.py", given, args.threads)

    work = args.work_dir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rows: list[Measurement] = []
    try:
        tiny = work / "tiny"
        build_in_subprocess(tiny, 1, argparse.Namespace(hidden=64, intermediate=64, experts=args.experts,
                                                        vocab=args.vocab))
        baseline, _ = peak_rss_of(quantize_command(tiny, work / "out-tiny", args.methods[0], "lazy", args),
                                  work / "baseline.log")
        log.info("baseline RSS (the same quantization of a one-layer hidden-64 model): %.2f GB", baseline / 1e9)
        for layers in args.layers:
            ckpt = work / f"moe-{layers}l"
            t0 = time.perf_counter()
            size, layer_bytes = build_in_subprocess(ckpt, layers, args)
            log.info("%d layers: checkpoint %.2f GB (one layer %.3f GB), written in %.0f s", layers, size / 1e9,
                     layer_bytes / 1e9, time.perf_counter() - t0)
            for method in args.methods:
                for mode in args.modes:
                    if (mode == "in-memory" and args.in_memory_max_layers is not None
                            and layers > args.in_memory_max_layers):
                        continue
                    label = f"{mode} {method}"
                    out = work / f"out-{layers}l-{mode}-{method}"
                    peak, seconds = peak_rss_of(quantize_command(ckpt, out, method, mode, args),
                                                work / f"{layers}l-{mode}-{method}.log")
                    rows.append(Measurement(label, layers, size, layer_bytes, peak, seconds))
                    log.info("%d layers, %s: peak RSS %.2f GB = %.2f x checkpoint (%.0f s)", layers, label,
                             peak / 1e9, peak / size, seconds)
                    shutil.rmtree(out)
            shutil.rmtree(ckpt)
    finally:  # checkpoints and outputs go; the small per-run logs stay for a look after a failure
        for child in work.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)

    log.info("%-20s %6s %12s %12s %8s", "run", "layers", "checkpoint", "peak RSS", "ratio")
    for r in rows:
        log.info("%-20s %6d %9.2f GB %9.2f GB %8.2f", r.label, r.layers, r.checkpoint_bytes / 1e9,
                 r.peak_rss_bytes / 1e9, r.peak_rss_bytes / r.checkpoint_bytes)
    if args.write:
        write_report(args.write, command, args, baseline, rows)
        log.info("wrote %s", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
