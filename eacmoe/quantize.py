"""`python -m eacmoe.quantize`: quantize a MoE model with QESC (GPTQ + router re-calibration), GPTQ or RTN.

With no flags it quantizes the bundled tiny-mixtral to 2-bit experts / 4-bit attention with QESC on the
bundled calibration text, evaluates it against the FP model and writes out/tiny-mixtral-qesc-w2/.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .cli import OneLineErrorParser, print_error, setup_logging  # first: it quietens third-party start-up logs
from .assets import BUNDLED_MODELS, DEFAULT_MODEL  # noqa: E402
from .job_checks import DTYPES, ROUTER_SOLVERS  # noqa: E402
from .expert_hessian import EXPERT_HESSIANS  # noqa: E402
from .pipeline import METHODS  # noqa: E402
from .quant.grid import GRID_SEARCHES  # noqa: E402
from .sparse_experts import SPARSE_EXPERT_POLICIES, policy_help  # noqa: E402
from .threads import add_threads_argument  # noqa: E402

log = logging.getLogger("eacmoe.quantize")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="python -m eacmoe.quantize", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"bundled model ({', '.join(BUNDLED_MODELS)}), local directory or hub id "
                        "(e.g. mistralai/Mixtral-8x7B-v0.1)")
    p.add_argument("--bits", default="2",
                   help="expert bits: 2, 3, 4, 8; 2.5 = first half of the layers 3-bit, second half 2-bit "
                        "(EAC-MoE); a comma list with one width per decoder layer; or auto:B (e.g. auto:2.5): "
                        "widths from {2,3,4} per routed expert (per layer with --no-per-expert-bits) averaging at "
                        "most B over the expert weights, chosen by a knapsack on --sensitivity or, without it, on a "
                        "proxy measured in the run (eacmoe/bit_allocation.py); auto:2.5 with the other defaults is "
                        "the measured 2.5-bit recipe (docs/QUANTIZING.md); a layer's entry in the list may give one "
                        "width per routed expert, 2/3/2/..., optionally after its shared experts' width and a colon "
                        "(4:2/3/2/...), as auto:B prints")
    p.add_argument("--sensitivity", default=None, metavar="FILE",
                   help="for --bits auto:B: the sensitivity.json of python -m eacmoe.eval --sensitivity, measured on "
                        "this model's weights (per-layer KL of 2-bit GPTQ experts, per expert, per shared expert)")
    p.add_argument("--per-expert-bits", action=argparse.BooleanOptionalAction, default=None,
                   help="with --bits auto:B: choose the widths per routed expert (and per layer for shared experts "
                        "and dense MLPs), under the same budget; sensitivities from the --sensitivity file's "
                        "per-expert and shared-expert cells, or an in-run per-module proxy. The default for auto:B "
                        "(measured better than per layer on both bundled models, with and without a file); "
                        "--no-per-expert-bits gives every expert of a layer one width")
    p.add_argument("--attn-bits", type=int, default=4, help="attention bits (2, 3, 4, 8; 16 keeps attention FP)")
    p.add_argument("--method", choices=METHODS, default="qesc",
                   help="rtn: round-to-nearest; gptq: GPTQ, routers untouched; qesc: GPTQ + TopK-MSE router "
                        "calibration (EAC-MoE); qesc-mse: the same with plain MSE over all experts (ablation)")
    p.add_argument("--group-size", type=int, default=128, help="columns per quantization group; -1 = per channel")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric with zero points)")
    p.add_argument("--act-order", action="store_true", help="GPTQ act-order: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--grid", choices=GRID_SEARCHES, default="mse",
                   help="how each group's range is chosen: mse = shrunk to minimise the group's rounding error, "
                        "inside GPTQ weighted by each column's loss factor (eacmoe/quant/grid.py; measured in "
                        "docs/QUANTIZING.md); minmax = its min and max (the paper's GPTQ, GPTQModel's default)")
    p.add_argument("--calib", default="bundled",
                   help="calibration text: bundled, wikitext2, c4 (online only) or a .txt/.jsonl path")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per calibration sequence (default: the model's context, at most 2048 as in the paper)")
    p.add_argument("--router-topk", type=int, default=None,
                   help="K of the TopK-MSE router loss (default: from the model: 8 of 16 experts, 20 of 64, 4 of 8)")
    p.add_argument("--router-steps", type=int, default=1000, help="most Adam steps of router calibration (stops early after 100 steps without held-out improvement)")
    p.add_argument("--router-lr", type=float, default=1e-3, help="Adam learning rate of router calibration")
    p.add_argument("--router-solver", choices=ROUTER_SOLVERS, default="adam",
                   help="adam: early-stopped Adam from the FP router; ridge: the exact TopK-MSE minimiser with damping "
                        "toward the FP router, damping chosen on held-out tokens (docs/ROUTER_SWEEP.md compares them)")
    p.add_argument("--sparse-expert-policy", choices=tuple(SPARSE_EXPERT_POLICIES), default="pool",
                   help=policy_help() + " (eacmoe/sparse_experts.py)")
    p.add_argument("--min-expert-tokens", type=int, default=None,
                   help="the fewest routed calibration tokens an expert is GPTQ'd on by itself; under it "
                        "--sparse-expert-policy applies (default: the expert's input width)")
    p.add_argument("--expert-hessian", choices=tuple(EXPERT_HESSIANS), default="routed",
                   help="token weights in the experts' GPTQ Hessians: routed = every token routed to the expert "
                        "counts once (GPTQModel); weighted = each counts with its combine weight g (after the "
                        "family's renormalisation), the shared expert with its gate (MoEQuant); docs/QUANTIZING.md")
    p.add_argument("--gptq-target", default="quantized", metavar="{quantized,fp,fp:A}",
                   help="what the routed experts' GPTQ fits: quantized = the layer output on the quantized "
                        "model's inputs (GPTQ); fp = the FP model's expert output on the FP model's inputs for the "
                        "same tokens (asymmetric calibration, GPTAQ); fp:A (0 < A <= 1) fits the inputs "
                        "X_q + A (X_fp - X_q). Needs --method qesc or qesc-mse (the FP stream); "
                        "eacmoe/gptq_target.py")
    p.add_argument("--eval-samples", type=int, default=32, help="held-out sequences for the final evaluation")
    p.add_argument("--eval-seqlen", type=int, default=None,
                   help="tokens per held-out sequence (default: the model's context, at most 512)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="auto",
                   help="compute dtype; auto = float32 on CPU, the model's dtype on GPU")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration sampling and router calibration")
    p.add_argument("--out", default=None, help="output directory (default: out/<model>-<method>-w<bits>)")
    p.add_argument("--format", choices=("packed", "gptq", "dequantized"), default="packed",
                   help="packed: low-bit weights + the runtime code, loaded with "
                        "AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True) or lm_eval "
                        "(pretrained=out,trust_remote_code=True); gptq: GPTQModel's checkpoint layout (format gptq, "
                        "per-expert names) for GPTQModel and vLLM; dequantized: the quantized values as ordinary "
                        "weights in the checkpoint's dtype, for any tool")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from <out>.partial; refused when that progress was made from "
                        "another model (weights, config, dtype), other settings or other calibration tokens. Without "
                        "--resume, old progress there is discarded (logged as a warning)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory that eacmoe wrote (it holds a .eacmoe-output marker); "
                        "any other directory is refused, never deleted")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=None,
                   help="read decoder layers from the checkpoint one at a time instead of loading the whole model, "
                        "so memory scales with one layer (needs safetensors); default: lazy when the model takes "
                        "more than 2 GiB in memory")
    add_threads_argument(p, default=None)  # None: torch's own choice; the count used is in report.json
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from .adapters import UnsupportedModelError
    from .calibration import CalibrationDataError
    from .report import format_summary
    from .schedule import BitsError
    from .weight_scan import NonFiniteWeightsError
    from .workflow import JobError, QuantizeJob, run_job

    job = QuantizeJob(model=args.model, bits=args.bits, method=args.method,
                      attn_bits=None if args.attn_bits == 16 else args.attn_bits, group_size=args.group_size,
                      sym=args.sym, act_order=args.act_order, grid=args.grid, calib=args.calib, nsamples=args.nsamples,
                      seqlen=args.seqlen, router_topk=args.router_topk, router_steps=args.router_steps,
                      router_lr=args.router_lr, router_solver=args.router_solver,
                      sparse_expert_policy=args.sparse_expert_policy, min_expert_tokens=args.min_expert_tokens,
                      expert_hessian=args.expert_hessian, gptq_target=args.gptq_target,
                      eval_samples=args.eval_samples, eval_seqlen=args.eval_seqlen, device=args.device,
                      dtype=args.dtype, seed=args.seed, out=args.out, resume=args.resume, overwrite=args.overwrite,
                      lazy=args.lazy, format=args.format, threads=args.threads, sensitivity=args.sensitivity,
                      per_expert_bits=args.per_expert_bits)
    try:
        report = run_job(job)
    except (JobError, BitsError, CalibrationDataError, UnsupportedModelError, NonFiniteWeightsError) as exc:
        print_error(exc)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command with --resume to continue", file=sys.stderr)
        return 130
    print(format_summary(report))
    print(f"\nwrote {report['out']} (report.json, report.png, quantized model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
