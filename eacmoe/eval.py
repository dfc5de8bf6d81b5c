"""`python -m eacmoe.eval --model M`: RTN, GPTQ, QESC, QESC+PESF, SZ3 and ZFP at matched bits per weight.

    python -m eacmoe.eval --model tiny-mixtral --threads 1 --out runs/eval/tiny-mixtral
    python -m eacmoe.eval --model tiny-mixtral --limit 4 --methods fp gptq sz3 --bits 2 rel:0.3 --out /tmp/quick

Every cell (method @ bits) is built in memory from the FP model and measured against it: held-out perplexity
(bundled test split, WikiText-2 when available), KL to FP, expert-shift rates and, with --suite, the lm-eval suite.
Finished cells are appended to <out>/results.jsonl, so an interrupted sweep continues where it stopped;
<out>/REPORT.md and <out>/pareto.png are rewritten at the end. See eacmoe/evaluation.py for the bits accounting.

    python -m eacmoe.eval --model tiny-mixtral --sensitivity --limit 4 --threads 1 --out /tmp/quick

--sensitivity runs the sensitivity study instead (eacmoe/sensitivity.py: Normal noise, SZ3 at matched error and
2-bit GPTQ on single experts, layers and thirds) into <out>/sensitivity/; --methods and --bits do not apply to it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import OneLineErrorParser, positive_int, print_error, setup_logging
from .threads import add_threads_argument, command_line, set_threads

PROGRAM = "python -m eacmoe.eval"


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .evaluation import DEFAULT_BITS, DEFAULT_METHODS, DEFAULT_PESF_ALPHA, METHODS

    ap = OneLineErrorParser(prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-mixtral", help="bundled model name, local directory or hub id")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                    help=f"methods to compare (of {', '.join(METHODS)}; default: %(default)s)")
    ap.add_argument("--bits", nargs="+", default=list(DEFAULT_BITS),
                    help="targets: a number is an expert bit schedule for quantized methods (2.5 = mixed) and bpw:<n> "
                         "for codecs; a codec bound (rel:0.3, abs:1e-3, bpw:2.2) applies to codecs only "
                         "(default: %(default)s)")
    ap.add_argument("--out", type=Path, required=True, help="output directory (results.jsonl, REPORT.md, pareto.png)")
    ap.add_argument("--limit", type=positive_int, default=None,
                    help="a quick look: this many held-out windows per source and suite items per task")
    ap.add_argument("--eval-samples", type=positive_int, default=32, help="held-out windows per source")
    ap.add_argument("--eval-seqlen", type=positive_int, default=None,
                    help="held-out window length (default: the model's context, at most 512)")
    ap.add_argument("--nsamples", type=positive_int, default=128, help="calibration sequences (GPTQ, QESC)")
    ap.add_argument("--seqlen", type=positive_int, default=None,
                    help="calibration sequence length (default: the model's context, at most 2048)")
    ap.add_argument("--group-size", type=int, default=128, help="quantization group size (-1: per channel)")
    ap.add_argument("--seed", type=int, default=0, help="calibration seed")
    ap.add_argument("--pesf-alpha", type=_non_negative_float, default=DEFAULT_PESF_ALPHA,
                    help="PESF skip threshold of qesc+pesf (default: %(default)s, from docs/pesf)")
    ap.add_argument("--suite", action="store_true", help="also run the lm-eval suite of eval/ on every cell")
    ap.add_argument("--suite-tasks", default="eacmoe_cloze,eacmoe_nextsent", help="lm-eval tasks of --suite")
    ap.add_argument("--suite-limit", type=positive_int, default=None,
                    help="items per suite task (default: --limit, else all)")
    ap.add_argument("--codec-workers", type=positive_int, default=None,
                    help="worker processes of the codec throughput 'all threads' row (default: every available core)")
    ap.add_argument("--sensitivity", action="store_true",
                    help="run the sensitivity study (eacmoe/sensitivity.py) into <out>/sensitivity/, not the sweep")
    ap.add_argument("--noise-levels", nargs="+", type=_non_negative_float, default=None,
                    help="--sensitivity: the noise levels p (error std = p x mean|w|; default: 0.1 0.3 0.5 0.8)")
    ap.add_argument("--per-expert", action=argparse.BooleanOptionalAction, default=None,
                    help="--sensitivity: 2-bit GPTQ of each expert alone (default: when the model has at most 256 "
                         "routed experts)")
    add_threads_argument(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    setup_logging()
    threads = set_threads(args.threads)

    from .codecs import UnreachableBits
    from .evaluation import SweepError, SweepSettings, plan_cells, run_sweep
    from .job_checks import JobError
    from .schedule import BitsError, check_group_size

    try:
        check_group_size(args.group_size, [])  # the number alone; its fit to the model is checked on loading
        cells = None if args.sensitivity else plan_cells(args.methods, args.bits)
        settings = SweepSettings(
            eval_samples=args.limit or args.eval_samples, eval_seqlen=args.eval_seqlen, nsamples=args.nsamples,
            seqlen=args.seqlen, group_size=args.group_size, seed=args.seed, pesf_alpha=args.pesf_alpha,
            suite_tasks=tuple(t for t in args.suite_tasks.split(",") if t) if args.suite else (),
            suite_limit=args.suite_limit or args.limit, threads=threads)
        if args.sensitivity:
            from .codecs import NOISE_LEVELS
            from .sensitivity import StudySettings, run_study

            study = StudySettings(sweep=settings, noise_levels=tuple(args.noise_levels or NOISE_LEVELS),
                                  per_expert=args.per_expert)
            run_study(args.model, study, args.out / "sensitivity", command_line(PROGRAM, argv, threads))
        else:
            run_sweep(args.model, cells, settings, args.out, command_line(PROGRAM, argv, threads),
                      codec_workers=args.codec_workers)
    except (SweepError, JobError, BitsError, UnreachableBits, ImportError) as exc:
        print_error(exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
