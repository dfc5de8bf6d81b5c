"""Packed low-bit runtime vs the FP model on this machine: prefill and decode tokens per second, weight memory and
peak RSS, as ratios measured in one run.

    python scripts/benchmark_runtime.py --threads 1 --out docs/BENCHMARKS.md

Each variant runs in its own subprocess (so peak RSS is its own), one after the other, on the same prompts:

- ``fp``: the source model of the checkpoint, ``from_pretrained`` in fp32 with the eager experts loop;
- ``packed``: the packed export (``trust_remote_code``), weights dequantized per forward, only for the experts hit;
- ``packed+pesf``: the same with PESF (alpha 0.3).

The machine is shared and noisy: compare the ratios of one run, not absolute numbers across runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from eacmoe.threads import add_threads_argument, command_line, set_threads  # noqa: E402

log = logging.getLogger("benchmark_runtime")
VARIANTS = ("fp", "packed", "packed+pesf")


def run_variant(variant: str, args) -> dict:
    """One variant, measured in this process (the worker side)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eacmoe.adapters import get_adapter
    from eacmoe.assets import resolve_model
    from eacmoe.heldout import heldout_sequences
    from eacmoe.pesf import PESFConfig, enable_pesf
    from eacmoe.speed import measure_speed, model_tensor_bytes, peak_rss_bytes

    threads = set_threads(args.threads)
    checkpoint = args.checkpoint
    if variant == "fp":
        source = json.loads((checkpoint / "config.json").read_text())["quantization"]["source_model"]
        model = AutoModelForCausalLM.from_pretrained(resolve_model(source), dtype=torch.float32,
                                                     experts_implementation="eager").eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32)
    if variant == "packed+pesf":
        enable_pesf(model, PESFConfig(alpha=args.pesf_alpha))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    context = getattr(model.config, "max_position_embeddings", args.prompt_len)
    prompt_len = min(args.prompt_len, context - args.decode_tokens)
    prompts = heldout_sequences("bundled-test", tokenizer, args.batch, prompt_len)
    result = measure_speed(model, prompts, args.decode_tokens, args.repeats).to_dict()
    adapter = get_adapter(model)
    layer_bytes = sum(model_tensor_bytes(layer) for layer in adapter.decoder_layers(model))
    result.update(variant=variant, weights_bytes=model_tensor_bytes(model), decoder_layer_bytes=layer_bytes,
                  peak_rss_bytes=peak_rss_bytes(), threads=threads)
    return result


def markdown(results: list[dict], args, command: str) -> str:
    fp = r0 = results[0]
    lines = [
        f"Produced by `{command}` on {os.cpu_count()} CPU cores ({r0['threads']} torch thread(s)), "
        f"batch {r0['batch']} x {r0['prompt_tokens']} prompt tokens, {r0['decode_tokens']} greedy decode steps, "
        f"median of {args.repeats}; checkpoint `{args.checkpoint.name}`. Ratios are to `fp` in the same run.",
        "",
        "| variant | weights in memory MB | x fp | of which decoder layers MB | x fp | peak RSS GB "
        "| prefill tok/s | x fp | decode tok/s | x fp | prompt ppl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['weights_bytes'] / 1e6:.1f} | {r['weights_bytes'] / fp['weights_bytes']:.2f} | "
            f"{r['decoder_layer_bytes'] / 1e6:.1f} | {r['decoder_layer_bytes'] / fp['decoder_layer_bytes']:.2f} | "
            f"{r['peak_rss_bytes'] / 1e9:.2f} | {r['prefill_tokens_per_second']:.0f} | "
            f"{r['prefill_tokens_per_second'] / fp['prefill_tokens_per_second']:.2f} | "
            f"{r['decode_tokens_per_second']:.1f} | {r['decode_tokens_per_second'] / fp['decode_tokens_per_second']:.2f} | "
            f"{r['prompt_perplexity']:.2f} |")
    lines += [
        "",
        "- *weights in memory*: every parameter and buffer of the loaded model. `fp` holds fp32 (the CPU compute "
        "dtype; the bf16 checkpoint is half that). The packed model keeps attention and experts as packed codes + fp16 "
        "scales + packed zero points; embeddings, LM head, norms and routers stay unquantized (on a tiny model they "
        "are most of the bytes, hence the separate decoder-layer column).",
        "- *prefill / decode*: the packed runtime dequantizes every weight it uses at every forward (only the experts "
        "the tokens were routed to), so it trades speed for memory; decoding one token at a time pays that cost per "
        "step. PESF changes only the prefill (decode differences between the two packed rows are noise).",
        "- *prompt ppl*: perplexity of the prompts themselves, a check that the variants compute the same model "
        "(`packed` = the quantized model; PESF drops the routing slots of rarely used experts).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from deploy_24gb import DEFAULT_CHECKPOINT, ensure_checkpoint

    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                    help="packed eacmoe export (default: the README main command's output, made if missing)")
    ap.add_argument("--batch", type=int, default=4, help="prompts per prefill")
    ap.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt (cut to the model's context)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="greedy decode steps")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median)")
    add_threads_argument(ap)
    ap.add_argument("--pesf-alpha", type=float, default=0.3, help="PESF threshold of the packed+pesf variant")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here (e.g. docs/BENCHMARKS.md)")
    ap.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.worker:
        args.worker_out.write_text(json.dumps(run_variant(args.worker, args)))
        return 0

    args.checkpoint = ensure_checkpoint(args.checkpoint)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            out = Path(tmp) / f"{variant}.json"
            command = [sys.executable, __file__, "--worker", variant, "--worker-out", str(out),
                       "--checkpoint", str(args.checkpoint), "--batch", str(args.batch),
                       "--prompt-len", str(args.prompt_len), "--decode-tokens", str(args.decode_tokens),
                       "--repeats", str(args.repeats), "--threads", str(args.threads),
                       "--pesf-alpha", str(args.pesf_alpha)]
            log.info("measuring %s", variant)
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            results.append(json.loads(out.read_text()))
    shown = command_line("python scripts/benchmark_runtime.py", sys.argv[1:] if argv is None else argv, args.threads)
    table = markdown(results, args, shown)
    print("\n" + table)
    if args.out is not None:
        args.out.write_text("# Packed runtime vs FP on CPU\n\n" + table)
        log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
