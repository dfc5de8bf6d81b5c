"""Measure router-calibration settings (the paper gives no optimiser, learning rate or steps).

One QESC run records, for every MoE layer, the FP router weight and the router inputs of the FP and the
quantized stream. Each setting (learning rate x steps, and K) then re-fits the routers on the first 80% of
those tokens and is scored on the last 20%: TopK-MSE, and the layer's expert-shift rate ("any of the top-k
changed" against the FP router on FP inputs) with the calibrated vs the uncalibrated router.

    python scripts/router_sweep.py --model tiny-mixtral --bits 2 --threads 1 --out docs/router_sweep.md
"""
from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

import eacmoe.pipeline as pipeline
from eacmoe.adapters import get_adapter
from eacmoe.calibration import get_calibration_data
from eacmoe.expert_shift import change_counts
from eacmoe.router_calibration import RouterCalibrationConfig, calibrate_router, topk_mse
from eacmoe.schedule import parse_expert_bits
from eacmoe.threads import add_threads_argument, command_line, set_threads
from eacmoe.workflow import load_model

log = logging.getLogger("router_sweep")


def record_router_inputs(model, bits: str, nsamples: int, seqlen: int, seed: int, tokenizer,
                         group_size: int = 128) -> list[dict]:
    """Run QESC once and keep each layer's (W, x_fp, x_q, K, top-k)."""
    records = []
    original = pipeline.calibrate_router

    def recording(weight, x_fp, x_q, config, selection_scores=None):
        records.append({"weight": weight.clone(), "x_fp": x_fp.clone(), "x_q": x_q.clone(), "topk": config.topk})
        return original(weight, x_fp, x_q, config, selection_scores)

    pipeline.calibrate_router = recording
    try:
        n_layers = len(get_adapter(model).decoder_layers(model))
        cfg = pipeline.QuantizeConfig(expert_bits=parse_expert_bits(bits, n_layers), method="qesc", seed=seed,
                                      group_size=group_size)
        pipeline.LayerwiseQuantizer(model, cfg).run(get_calibration_data("bundled", tokenizer, nsamples, seqlen, seed))
    finally:
        pipeline.calibrate_router = original
    top_k = get_adapter(model).top_k(get_adapter(model).moe_block(get_adapter(model).decoder_layers(model)[0]))
    for r in records:
        r["model_topk"] = top_k
    return records


def score(record: dict, weight: torch.Tensor, test: slice) -> tuple[float, float]:
    w_fp, x_fp, x_q = record["weight"].float(), record["x_fp"][test].float(), record["x_q"][test].float()
    target = x_fp @ w_fp.T
    logits = x_q @ weight.float().T
    mse = topk_mse(target, logits, target.topk(record["topk"], -1).indices).item()
    k = record["model_topk"]
    shift = (change_counts(target.topk(k, -1).indices, logits.topk(k, -1).indices) > 0).float().mean().item()
    return mse, shift


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-mixtral", help="bundled name or path")
    ap.add_argument("--bits", default="2", help="expert bits of the recording run")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration sequence length (the bundled models' context)")
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2], help="Adam learning rates")
    ap.add_argument("--steps", nargs="+", type=int, default=[50, 200, 1000], help="Adam steps")
    ap.add_argument("--ks", nargs="+", type=int, default=None, help="TopK-MSE K values (default: the model's default)")
    ap.add_argument("--group-size", type=int, default=128, help="GPTQ group size of the recording run (tiny-qwen-moe: 64)")
    ap.add_argument("--seed", type=int, default=0, help="seed")
    ap.add_argument("--objectives", nargs="+", choices=("auto", "tokens", "statistics"), default=["auto"],
                    help="how Adam evaluates the loss (same values; compare their time per layer)")
    ap.add_argument("--out", type=Path, default=None, help="markdown file for the table")
    add_threads_argument(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    threads = set_threads(args.threads)
    model, tokenizer = load_model(args.model, torch.float32)
    records = record_router_inputs(model, args.bits, args.nsamples, args.seqlen, args.seed, tokenizer, args.group_size)
    n = records[0]["x_q"].shape[0]
    fit, test = slice(0, int(0.8 * n)), slice(int(0.8 * n), n)
    base = [score(r, r["weight"], test) for r in records]
    command = command_line("python scripts/router_sweep.py", sys.argv[1:] if argv is None else argv, threads)
    lines = [f"`{command}`: {len(records)} MoE layers, {n} tokens (fit on 80%, scored on 20%), "
             f"{threads} torch CPU thread(s).", "",
             "| K | solver | objective | lr | steps | held-out TopK-MSE (mean over layers) "
             "| shift any % (uncalibrated → calibrated) | seconds per layer |",
             "|---|---|---|---|---|---|---|---|",
             f"| – | – | – | – | 0 | {statistics.mean(m for m, _ in base):.4g} | "
             f"{100 * statistics.mean(s for _, s in base):.2f} | – |"]
    # Adam over the grid; "ridge" = the exact minimiser with damping toward the FP router, chosen on held-out tokens
    solvers = [("adam", objective, lr, steps)
               for objective, lr, steps in itertools.product(args.objectives, args.lrs, args.steps)]
    solvers.append(("ridge", "statistics", None, None))
    for k, (solver, objective, lr, steps) in itertools.product(args.ks or [None], solvers):
        scores, start = [], time.perf_counter()
        for r in records:
            topk = min(k or r["topk"], r["weight"].shape[0])
            config = RouterCalibrationConfig(topk=topk, seed=args.seed, solver=solver, objective=objective,
                                             **({"steps": steps, "lr": lr} if solver == "adam" else {}))
            result = calibrate_router(r["weight"], r["x_fp"][fit], r["x_q"][fit], config)
            scores.append(score({**r, "topk": topk}, result.weight, test))
        seconds = (time.perf_counter() - start) / len(records)
        lines.append(f"| {k or 'default'} | {solver} | {objective} | {'–' if lr is None else f'{lr:g}'} | "
                     f"{steps or '–'} | {statistics.mean(m for m, _ in scores):.4g} | "
                     f"{100 * statistics.mean(s for _, s in base):.2f} → {100 * statistics.mean(s for _, s in scores):.2f} "
                     f"| {seconds:.2f} |")
        log.info(lines[-1])
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
