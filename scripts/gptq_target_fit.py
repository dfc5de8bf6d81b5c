"""Fit against generalisation of `--gptq-target`: KL to the FP model on the calibration tokens themselves and on the
held-out test split, for each target, same seed and calibration tokens (QESC, 2-bit experts, FP attention).

    python scripts/gptq_target_fit.py --seeds 0 --targets quantized fp fp:0.5 fp:0.25 --threads 1

A target that lowers the calibration KL but raises the held-out KL is over-fitting the calibration set. Prints a
markdown table; the first line states the thread count.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eacmoe.adapters import get_adapter  # noqa: E402
from eacmoe.calibration import get_calibration_data  # noqa: E402
from eacmoe.expert_shift import measure_expert_shift, measure_fp_reference  # noqa: E402
from eacmoe.heldout import heldout_sequences  # noqa: E402
from eacmoe.pipeline import LayerwiseQuantizer, QuantizeConfig  # noqa: E402
from eacmoe.schedule import parse_expert_bits  # noqa: E402
from eacmoe.threads import add_threads_argument, command_line, set_threads  # noqa: E402
from eacmoe.workflow import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-mixtral", help="bundled model name or path")
    ap.add_argument("--targets", nargs="+", default=["quantized", "fp", "fp:0.5", "fp:0.25"],
                    help="--gptq-target values to compare")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration seeds")
    ap.add_argument("--bits", default="2", help="expert bits")
    ap.add_argument("--group-size", type=int, default=128, help="GPTQ group size")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration sequences")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration and held-out sequence length")
    ap.add_argument("--eval-samples", type=int, default=32,
                    help="held-out sequences, and calibration sequences evaluated (the first ones)")
    add_threads_argument(ap)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    print(f"`{command_line('python scripts/gptq_target_fit.py', sys.argv[1:] if argv is None else argv, threads)}` "
          f"({threads} torch CPU thread(s))\n")
    fp, tokenizer = load_model(args.model, torch.float32)
    layers = len(get_adapter(fp).decoder_layers(fp))
    held = heldout_sequences("bundled-test", tokenizer, args.eval_samples, args.seqlen)
    held_ref = measure_fp_reference(fp, held, batch_size=8)
    print("| seed | target | calibration KL ×1e3 | calibration ppl | held-out KL ×1e3 | held-out ppl |")
    print("|---|---|---|---|---|---|")
    for seed in args.seeds:
        calib = get_calibration_data("bundled", tokenizer, args.nsamples, args.seqlen, seed=seed)
        seen = calib[:args.eval_samples]
        seen_ref = measure_fp_reference(fp, seen, batch_size=8)
        for target in args.targets:
            q = copy.deepcopy(fp)
            cfg = QuantizeConfig(expert_bits=parse_expert_bits(args.bits, layers), attn_bits=None,
                                 group_size=args.group_size, seed=seed, gptq_target=target)
            LayerwiseQuantizer(q, cfg).run(calib)
            on_calib = measure_expert_shift(fp, q, seen, batch_size=8, reference=seen_ref)
            on_held = measure_expert_shift(fp, q, held, batch_size=8, reference=held_ref)
            print(f"| {seed} | {target} | {1e3 * on_calib.kl_from_fp['q/q']:.2f} | {on_calib.perplexity['q/q']:.3f} | "
                  f"{1e3 * on_held.kl_from_fp['q/q']:.2f} | {on_held.perplexity['q/q']:.3f} |", flush=True)
            del q


if __name__ == "__main__":
    main()
