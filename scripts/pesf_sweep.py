"""PESF threshold sweep: how much prefill work each alpha removes, what it costs in quality, and what it buys in
prefill speed, with the dropped or the renormalised routing weights.

    python scripts/pesf_sweep.py --threads 1           # bundled tiny-mixtral (FP), writes docs/pesf/
    python scripts/pesf_sweep.py --model out/tiny-mixtral-qesc-w2 --threads 1    # a packed eacmoe export (QESC + PESF)

For every alpha (0 = PESF off) and both ways of treating a skipped expert's weight, on held-out sequences of the
bundled test split, each processed as one prefill:
- skipped slots: share of the (token, top-k slot) routing assignments PESF removed (= expert work skipped);
- ppl and KL(no PESF || PESF) of the next-token distributions, against the same model without PESF;
- suite accuracies (lm-eval cloze and next-sentence; every lm-eval request is one prefill);
- prefill speed-up: median prefill time without PESF / with it, measured in this run, interleaved.
PESF decides per sequence from the routing counts of the whole prompt, as in the paper (so a token's output can
depend on later tokens of its prompt: it is a prefill-only method; decoding is never changed).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "eval"))

from eacmoe.assets import resolve_model  # noqa: E402
from eacmoe.heldout import heldout_sequences  # noqa: E402
from eacmoe.pesf import PESFConfig, disable_pesf, enable_pesf  # noqa: E402
from eacmoe.speed import measure_speed  # noqa: E402
from eacmoe.threads import add_threads_argument, command_line, set_threads  # noqa: E402

log = logging.getLogger("pesf_sweep")


def load(model: str):
    path = resolve_model(model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=True)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # PESF marks skipped slots for the eager experts loop
    return model.eval(), AutoTokenizer.from_pretrained(path, trust_remote_code=True)


@torch.no_grad()
def quality(model, sequences: torch.Tensor, settings: list[PESFConfig], batch_size: int) -> tuple[dict, list[dict]]:
    """ppl, KL from the model without PESF and the skipped share, without PESF and per setting, on the same prefills."""
    totals = [{"nll": 0.0, "kl": 0.0, "skipped": 0, "slots": 0} for _ in settings]
    reference_nll, count = 0.0, 0
    for start in range(0, sequences.shape[0], batch_size):
        ids = sequences[start:start + batch_size]
        targets = ids[:, 1:].flatten()
        disable_pesf(model)
        reference = model(ids).logits[:, :-1].float().flatten(0, 1).log_softmax(-1)
        reference_nll += F.nll_loss(reference, targets, reduction="sum").item()
        for total, config in zip(totals, settings):
            stats = enable_pesf(model, config)
            logprobs = model(ids).logits[:, :-1].float().flatten(0, 1).log_softmax(-1)
            total["nll"] += F.nll_loss(logprobs, targets, reduction="sum").item()
            total["kl"] += (reference.exp() * (reference - logprobs)).sum().item()
            total["skipped"] += sum(s.skipped_slots for s in stats.values())
            total["slots"] += sum(s.slots for s in stats.values())
        count += targets.numel()
    disable_pesf(model)
    without = {"ppl": math.exp(reference_nll / count), "kl": 0.0, "skipped_slots": 0.0}
    return without, [{"ppl": math.exp(t["nll"] / count), "kl": t["kl"] / count,
                      "skipped_slots": t["skipped"] / max(1, t["slots"])} for t in totals]


def prefill_speedups(model, prompts: torch.Tensor, settings: list[PESFConfig], rounds: int) -> list[float]:
    """Median prefill time without PESF over with it; the two are timed alternately so load drifts cancel."""
    ratios = []
    for config in settings:
        pairs = []
        for _ in range(rounds):
            disable_pesf(model)
            base = measure_speed(model, prompts, decode_tokens=0, repeats=1).prefill_seconds
            enable_pesf(model, config)
            pesf = measure_speed(model, prompts, decode_tokens=0, repeats=1).prefill_seconds
            pairs.append(base / pesf)
        ratios.append(sorted(pairs)[len(pairs) // 2])
    disable_pesf(model)
    return ratios


def suite(model, tokenizer, config: PESFConfig | None, tasks: list[str], limit: float, batch_size: int) -> dict:
    from run_suite import evaluate_model_object, summarize

    if config is None:
        disable_pesf(model)
    else:
        enable_pesf(model, config)
    try:
        return summarize(evaluate_model_object(model, tokenizer, tasks, limit=limit, batch_size=batch_size))
    finally:
        disable_pesf(model)


def write_report(rows: list[dict], meta: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["alpha"] == 0)
    lines = ["# PESF threshold sweep", "", f"Produced by `{meta['command']}` ({meta['model']}, "
             f"{meta['eval_samples']} x {meta['seqlen']}-token held-out prefills of the bundled test split; prefill "
             f"speed on {meta['speed_batch']} x {meta['seqlen']} tokens, {meta['threads']} CPU thread(s); suite: "
             f"{meta['suite_limit']} items per task).", "",
             "alpha = 0 is the model without PESF. *skipped* = share of the prefill (token, top-k slot) routing "
             "assignments PESF removed; *drop* leaves the remaining routing weights as they are, *renormalise* "
             "rescales them to their original sum. KL(no PESF ‖ PESF) per token, ×1e3. Speed-up = prefill time without "
             "PESF / with it, median of interleaved pairs measured in this run.", "",
             "| alpha | weights | skipped % | ppl | Δ ppl | KL ×1e3 | prefill speed-up | cloze % | nextsent % |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r.get("suite", {})
        lines.append(f"| {r['alpha']:g} | {r['weights']} | {100 * r['skipped_slots']:.2f} | {r['ppl']:.2f} | "
                     f"{r['ppl'] - base['ppl']:+.2f} | {1e3 * r['kl']:.2f} | {r['prefill_speedup']:.2f}x | "
                     + (f"{100 * s['cloze_acc']:.1f} | {100 * s['nextsent_acc']:.1f} |" if s else "– | – |"))
    lines += ["", "![PESF sweep](pesf_sweep.png)", ""]
    (out / "PESF.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for weights, marker in (("drop", "o"), ("renormalise", "s")):
        rs = [r for r in rows if r["weights"] in (weights, "-")]
        x = [100 * r["skipped_slots"] for r in rs]
        axes[0].plot([r["alpha"] for r in rs], x, marker=marker, label=weights)
        axes[1].plot(x, [r["ppl"] - base["ppl"] for r in rs], marker=marker, label=weights)
        axes[2].plot(x, [r["prefill_speedup"] for r in rs], marker=marker, label=weights)
    axes[0].set(xlabel="alpha", ylabel="skipped routing slots %", title="work removed")
    axes[1].set(xlabel="skipped routing slots %", ylabel="Δ perplexity", title="quality cost")
    axes[2].set(xlabel="skipped routing slots %", ylabel="prefill speed-up (x)", title="prefill speed")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"PESF on {meta['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "pesf_sweep.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-mixtral", help="bundled model name, model directory or packed eacmoe export")
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
                    help="PESF thresholds (fraction of the uniform count; paper: 0.3); 0 (off) is always added")
    ap.add_argument("--eval-samples", type=int, default=64, help="held-out sequences for ppl / KL / skipped share")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per sequence (cut to the model's context)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per prefill for ppl / KL")
    ap.add_argument("--speed-batch", type=int, default=4, help="prompts per timed prefill (paper: 4)")
    ap.add_argument("--speed-rounds", type=int, default=5, help="interleaved timing pairs per setting (median)")
    ap.add_argument("--suite-tasks", default="eacmoe_cloze,eacmoe_nextsent", help="lm-eval tasks (comma list)")
    ap.add_argument("--suite-limit", type=float, default=100, help="items per suite task (0 skips the suite)")
    ap.add_argument("--suite-batch-size", type=int, default=1,
                    help="lm-eval batch size (PESF ignores padding: results do not depend on it)")
    add_threads_argument(ap)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "pesf", help="output directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if any(a < 0 for a in args.alphas):
        ap.error("alphas must be non-negative")
    threads = set_threads(args.threads)

    model, tokenizer = load(args.model)
    seqlen = min(args.seqlen, getattr(model.config, "max_position_embeddings", args.seqlen))
    sequences = heldout_sequences("bundled-test", tokenizer, args.eval_samples, seqlen)
    alphas = sorted({a for a in args.alphas if a > 0})
    settings = [PESFConfig(alpha=a, renormalize=r) for a in alphas for r in (False, True)]
    log.info("%d settings, %d held-out sequences of %d tokens", len(settings), sequences.shape[0], seqlen)

    without, measured = quality(model, sequences, settings, args.batch_size)
    speedups = prefill_speedups(model, sequences[: args.speed_batch], settings, args.speed_rounds)
    rows = [{"alpha": 0.0, "weights": "-", **without, "prefill_speedup": 1.0}]
    rows += [{"alpha": c.alpha, "weights": "renormalise" if c.renormalize else "drop", **m, "prefill_speedup": s}
             for c, m, s in zip(settings, measured, speedups)]
    tasks = [t for t in args.suite_tasks.split(",") if t]
    if tasks and args.suite_limit != 0:
        for row, config in zip(rows, [None] + settings):
            row["suite"] = suite(model, tokenizer, config, tasks, args.suite_limit, args.suite_batch_size)
    for r in rows:
        log.info("alpha %g %s: skipped %.2f%%, ppl %.2f, KL %.2e, prefill x%.2f", r["alpha"], r["weights"],
                 100 * r["skipped_slots"], r["ppl"], r["kl"], r["prefill_speedup"])
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command_line("python scripts/pesf_sweep.py", sys.argv[1:] if argv is None else argv, threads),
            "model": Path(str(args.model)).name, "eval_samples": sequences.shape[0], "seqlen": seqlen,
            "speed_batch": args.speed_batch, "threads": threads, "suite_limit": args.suite_limit}
    write_report(rows, meta, args.out)
    print((args.out / "PESF.md").read_text())


if __name__ == "__main__":
    main()
