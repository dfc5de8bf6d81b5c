"""Deploy a compressed MoE checkpoint on one 24 GB GPU (RTX 3090 class): load it under a memory cap, prefill
4 x 512 tokens (EAC-MoE's setting), decode, and print peak GPU memory and prefill / decode tokens per second,
without and with PESF.

    python scripts/deploy_24gb.py --threads 1        # bundled tiny-mixtral, QESC 2-bit (made if missing)
    python scripts/deploy_24gb.py --checkpoint out/mixtral-qesc-w3 --threads 1   # a real export, e.g. Mixtral-8x7B, 3 bits

The checkpoint is a packed eacmoe export (`python -m eacmoe.quantize --out DIR`), loaded with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. On a GPU the process is capped with
`torch.cuda.set_per_process_memory_fraction` so that it cannot use more than --memory-cap (24 GB by default) even on
a larger card; running out of memory under the cap is reported, not hidden. Without a GPU the same steps run on
the CPU (the bundled model's context is 256 tokens, so the prompt is cut to that) and the memory plan of
Mixtral-8x7B on a 24 GB card is printed instead (`python -m eacmoe.plan`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eacmoe.heldout import heldout_sequences  # noqa: E402
from eacmoe.pesf import PESFConfig, disable_pesf, enable_pesf  # noqa: E402
from eacmoe.plan import parse_memory  # noqa: E402
from eacmoe.speed import measure_speed, model_tensor_bytes, peak_rss_bytes  # noqa: E402
from eacmoe.threads import add_threads_argument, command_line, set_threads  # noqa: E402

log = logging.getLogger("deploy_24gb")
DEFAULT_CHECKPOINT = REPO / "out" / "tiny-mixtral-qesc-w2"


def ensure_checkpoint(path: Path) -> Path:
    """The default checkpoint is the README's main command's output; make it if it is not there yet."""
    if (path / "config.json").exists():
        return path
    if path != DEFAULT_CHECKPOINT:
        raise SystemExit(f"error: {path} is not a checkpoint directory (no config.json)")
    log.info("%s not found: quantizing the bundled tiny-mixtral first (python -m eacmoe.quantize)", path)
    from eacmoe.workflow import QuantizeJob, run_job

    run_job(QuantizeJob(out=str(path)))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="packed eacmoe export directory")
    ap.add_argument("--memory-cap", default="24GB", help="GPU memory the process may use: 24GB (1e9 bytes) or 22GiB")
    ap.add_argument("--batch", type=int, default=4, help="prompts per prefill (paper: 4)")
    ap.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt (paper: 512; cut to the model's context)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens decoded after the prefill")
    ap.add_argument("--pesf-alpha", type=float, default=0.3, help="PESF threshold for the second run (paper: 0.3)")
    ap.add_argument("--pesf-renormalize", action="store_true", help="renormalise the routing weights PESF leaves")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cuda:N or cpu")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the results as JSON")
    add_threads_argument(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    threads = set_threads(args.threads)
    command = command_line("python scripts/deploy_24gb.py", sys.argv[1:] if argv is None else argv, threads)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    checkpoint = ensure_checkpoint(args.checkpoint)
    cap_bytes = parse_memory(args.memory_cap)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)
        log.info("GPU %s, %.1f GB; process capped at %.1f GB", torch.cuda.get_device_name(device), total / 1e9,
                 min(cap_bytes, total) / 1e9)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=dtype,
                                                 device_map=str(device) if device.type == "cuda" else None)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)  # no question for older exports either
    context = getattr(model.config, "max_position_embeddings", args.prompt_len)
    prompt_len = min(args.prompt_len, context - args.decode_tokens)
    if prompt_len < args.prompt_len:
        log.info("prompt cut to %d tokens: the model's context is %d", prompt_len, context)
    prompts = heldout_sequences("bundled-test", tokenizer, args.batch, prompt_len).to(device)
    weights = model_tensor_bytes(model)
    log.info("loaded %s: %.1f MB of weights in memory", checkpoint, weights / 1e6)

    results = {}
    try:
        results["without PESF"] = measure_speed(model, prompts, args.decode_tokens, args.repeats)
        stats = enable_pesf(model, PESFConfig(alpha=args.pesf_alpha, renormalize=args.pesf_renormalize))
        results[f"PESF alpha={args.pesf_alpha:g}"] = measure_speed(model, prompts, args.decode_tokens, args.repeats)
        disable_pesf(model)
    except torch.cuda.OutOfMemoryError as exc:
        print(f"out of GPU memory under the {args.memory_cap} cap: {str(exc).splitlines()[0]}")
        return 1
    skipped = sum(s.skipped_slots for s in stats.values()) / max(1, sum(s.slots for s in stats.values()))

    base = next(iter(results.values()))
    print(f"\n$ {command}\n{checkpoint.name} on {device} ({'fp16' if dtype == torch.float16 else 'fp32'} compute, "
          f"{threads} torch CPU thread(s)), batch {args.batch} x {prompt_len} prompt tokens, {args.decode_tokens} "
          f"decoded tokens, weights {weights / 1e6:.1f} MB")
    print(f"{'setting':<18} {'prefill tok/s':>14} {'speedup':>8} {'decode tok/s':>13} {'prompt ppl':>11} {'peak GPU':>10}")
    for name, r in results.items():
        peak = f"{r.peak_gpu_bytes / 1e9:.2f} GB" if r.peak_gpu_bytes is not None else "-"
        print(f"{name:<18} {r.prefill_tokens_per_second:>14.0f} "
              f"{r.prefill_tokens_per_second / base.prefill_tokens_per_second:>7.2f}x "
              f"{r.decode_tokens_per_second:>13.1f} {r.prompt_perplexity:>11.2f} {peak:>10}")
    print(f"PESF skipped {100 * skipped:.1f}% of the prefill routing slots; decoding is unchanged by design.")
    if device.type == "cpu":
        print(f"peak RSS of this process: {peak_rss_bytes() / 1e9:.2f} GB")
        print("\nNo GPU here. What Mixtral-8x7B at QESC 3.03 bits needs on a 24 GB card "
              "(python -m eacmoe.plan --model mixtral-8x7b --bits 3 --attn-bits 4 --batch 4 --context 512):\n")
        from eacmoe.plan import main as plan_main

        plan_main(["--model", "mixtral-8x7b", "--bits", "3", "--attn-bits", "4", "--batch", str(args.batch),
                   "--context", str(args.prompt_len + args.decode_tokens), "--gpu-memory", args.memory_cap])
    if args.json_out is not None:
        payload = {"command": command, "threads": threads, "checkpoint": str(checkpoint), "device": str(device),
                   "weights_bytes": weights,
                   "pesf_skipped_slot_fraction": skipped, "results": {k: v.to_dict() for k, v in results.items()}}
        args.json_out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
