"""RTN / GPTQ / QESC / QESC-MSE on the bundled models: perplexity, KL to FP, expert shift, oracle routing,
suite accuracies, over several calibration seeds, with a PAIRED router comparison.

    python scripts/qesc_experiments.py --models tiny-mixtral tiny-qwen-moe --bits 2 2.5 3 --seeds 0 1 2 \
        --settings experts attn4 --out docs/qesc_results     # writes results.jsonl, RESULTS.md, shift.png

Paired comparison: every QESC run is evaluated twice, with its calibrated routers and with the FP routers put
back into the very same quantized model ("qesc-experts+fp-router"), so the router's own effect is measured
without the noise of different quantized experts. Rows are appended to results.jsonl as they finish, and a
rerun skips rows already there, so the (long) job can be interrupted and continued.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "eval"))

from eacmoe.adapters import get_adapter  # noqa: E402
from eacmoe.calibration import get_calibration_data  # noqa: E402
from eacmoe.expert_shift import measure_expert_shift  # noqa: E402
from eacmoe.heldout import heldout_sequences  # noqa: E402
from eacmoe.pipeline import LayerwiseQuantizer, QuantizeConfig  # noqa: E402
from eacmoe.schedule import parse_expert_bits  # noqa: E402
from eacmoe.workflow import load_model  # noqa: E402

log = logging.getLogger("qesc_experiments")
SETTINGS = {"experts": None, "attn4": 4}   # attention bits per setting (None = FP attention)


def evaluate(fp_model, q_model, tokenizer, heldout: dict, suite_limit: float | None) -> dict:
    row = {}
    for source, ids in heldout.items():
        rep = measure_expert_shift(fp_model, q_model, ids, batch_size=8)
        row[source] = {"ppl": rep.perplexity, "kl": rep.kl_from_fp, "shift": rep.mean_shift()}
    if suite_limit != 0:
        from run_suite import evaluate_model_object, summarize

        row["suite"] = summarize(evaluate_model_object(q_model, tokenizer, limit=suite_limit))
    return row


def restore_fp_routers(q_model, fp_model) -> None:
    adapter = get_adapter(q_model)
    for q_layer, fp_layer in zip(adapter.decoder_layers(q_model), adapter.decoder_layers(fp_model)):
        q_block, fp_block = adapter.moe_block(q_layer), adapter.moe_block(fp_layer)
        if q_block is not None:
            adapter.router_weight(q_block).data.copy_(adapter.router_weight(fp_block).data)


def run(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    done = set()
    if results_path.exists():
        done = {json.dumps(json.loads(line)["key"]) for line in results_path.read_text().splitlines() if line}
    for model_name in args.models:
        fp_model, tokenizer = load_model(model_name, torch.float32)
        heldout = {s: heldout_sequences(s, tokenizer, args.eval_samples, args.eval_seqlen) for s in ("bundled-test", "wikitext2")}
        heldout = {k: v for k, v in heldout.items() if v is not None}
        num_layers = len(get_adapter(fp_model).decoder_layers(fp_model))
        fp_key = {"model": model_name, "method": "fp"}
        if json.dumps(fp_key) not in done:
            append(results_path, fp_key, evaluate(fp_model, copy.deepcopy(fp_model), tokenizer, heldout, args.suite_limit))
        for setting in args.settings:
            for bits in args.bits:
                for method in args.methods:
                    for seed in ([0] if method == "rtn" else args.seeds):
                        key = {"model": model_name, "setting": setting, "bits": bits, "method": method, "seed": seed}
                        if json.dumps(key) in done:
                            continue
                        q_model = copy.deepcopy(fp_model)
                        cfg = QuantizeConfig(expert_bits=parse_expert_bits(bits, num_layers), method=method,
                                             attn_bits=SETTINGS[setting], group_size=args.group_size, seed=seed)
                        calib = get_calibration_data("bundled", tokenizer, args.nsamples, args.seqlen, seed=seed)
                        t0 = time.perf_counter()
                        LayerwiseQuantizer(q_model, cfg).run(calib)
                        seconds = time.perf_counter() - t0
                        append(results_path, key, {**evaluate(fp_model, q_model, tokenizer, heldout, args.suite_limit),
                                                   "seconds": seconds})
                        if method == "qesc":
                            restore_fp_routers(q_model, fp_model)
                            append(results_path, {**key, "method": "qesc-experts+fp-router"},
                                   evaluate(fp_model, q_model, tokenizer, heldout, args.suite_limit))
                        del q_model
    write_markdown(results_path, args.out / "RESULTS.md", " ".join(sys.argv))


def append(path: Path, key: dict, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps({"key": key, **row}) + "\n")
    log.info("%s done", key)


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def write_markdown(results_path: Path, md_path: Path, command: str) -> None:
    rows = [json.loads(line) for line in results_path.read_text().splitlines() if line]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        k = r["key"]
        groups.setdefault((k["model"], k.get("setting", ""), str(k.get("bits", "16")), k["method"]), []).append(r)
    lines = [f"Produced by `{command}`; mean ± sample standard deviation over calibration seeds.", "",
             "| model | setting | bits | method | n | test ppl | wikitext2 ppl | oracle ppl | KL(FP‖q) | shift any % | shift all % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, setting, bits, method), rs in groups.items():
        def col(source, f):
            vals = [f(r[source]) for r in rs if source in r]
            return _mean_spread(vals) if vals else "–"
        lines.append(f"| {model} | {setting} | {bits} | {method} | {len(rs)} | "
                     f"{col('bundled-test', lambda e: e['ppl']['q/q'])} | {col('wikitext2', lambda e: e['ppl']['q/q'])} | "
                     f"{col('bundled-test', lambda e: e['ppl']['q/fp'])} | {col('bundled-test', lambda e: e['kl']['q/q'])} | "
                     f"{col('bundled-test', lambda e: 100 * e['shift']['any'])} | "
                     f"{col('bundled-test', lambda e: 100 * e['shift']['all'])} |")
    md_path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen-moe"], help="bundled names or paths")
    ap.add_argument("--bits", nargs="+", default=["2", "2.5", "3"], help="expert bit schedules")
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "qesc", "qesc-mse"], help="methods to compare")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="calibration seeds")
    ap.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["experts", "attn4"],
                    help="experts: attention stays FP; attn4: attention 4-bit too")
    ap.add_argument("--group-size", type=int, default=128, help="GPTQ group size")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration sequence length (the bundled models' context)")
    ap.add_argument("--eval-samples", type=int, default=64, help="held-out sequences per source")
    ap.add_argument("--eval-seqlen", type=int, default=256, help="held-out sequence length (the bundled models' context)")
    ap.add_argument("--suite-limit", type=float, default=None,
                    help="items per suite task (0 skips the lm-eval suite; default: all)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "qesc_results", help="output directory")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    run(args)


if __name__ == "__main__":
    main()
