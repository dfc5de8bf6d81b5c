"""RTN / GPTQ / QESC / QESC-MSE on the bundled models: perplexity, KL to FP, expert shift, oracle routing,
suite accuracies, over several calibration seeds, with a PAIRED router comparison.

    python scripts/qesc_experiments.py --models tiny-mixtral tiny-qwen-moe --bits 2 2.5 3 --seeds 0 1 2 \
        --settings experts attn4 --threads 1 --out docs/qesc_results     # writes results.jsonl, RESULTS.md, shift.png

Paired comparison: every QESC run is evaluated twice, with its calibrated routers and with the FP routers put
back into the very same quantized model ("qesc-experts+fp-router"), so the router's own effect is measured
without the noise of different quantized experts. Rows are appended to results.jsonl as they finish, and a
rerun skips rows already there, so the (long) job can be interrupted and continued. Every row records the weights
and the torch thread count it was measured with, and a rerun refuses to add rows measured otherwise: the paired
differences are smaller than what another thread count changes.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "eval"))

from eacmoe.adapters import get_adapter  # noqa: E402
from eacmoe.calibration import get_calibration_data  # noqa: E402
from eacmoe.expert_shift import measure_expert_shift, measure_fp_reference  # noqa: E402
from eacmoe.heldout import heldout_sequences  # noqa: E402
from eacmoe.job_checks import check_group_size_for_model  # noqa: E402
from eacmoe.pipeline import LayerwiseQuantizer, QuantizeConfig  # noqa: E402
from eacmoe.schedule import parse_bits_schedule  # noqa: E402
from eacmoe.sparse_experts import SPARSE_EXPERT_POLICIES  # noqa: E402
from eacmoe.threads import add_threads_argument, command_line, set_threads  # noqa: E402
from eacmoe.workflow import bits_account, load_model  # noqa: E402

log = logging.getLogger("qesc_experiments")
SETTINGS = {"experts": None, "attn4": 4}   # attention bits per setting (None = FP attention)
# the order of rows in the tables and of bars and lines in the plots
METHOD_ORDER = ["fp", "rtn", "rtn+mse-grid", "gptq", "gptq+mse-grid", "gptq+weighted", "qesc-experts+fp-router", "qesc",
                "qesc+mse-grid", "qesc+weighted", "qesc+fp-target", "qesc+fp-target:0.5", "qesc+fp-target:0.25",
                "qesc+mse-grid+fp-target:0.25", "qesc+weighted+fp-target", "qesc-mse"]
# a method label is "<method>[+<expert Hessian>][+mse-grid][+fp-target[:A]][@<sparse expert policy>]": "qesc+weighted"
# = --method qesc --expert-hessian weighted; "+mse-grid" = --grid mse; "qesc+fp-target:0.25" = --gptq-target fp:0.25;
# "gptq@rtn" = --method
# gptq --sparse-expert-policy rtn (without @: the default, pool)


def method_config(label: str) -> dict:
    """QuantizeConfig fields of a method label ("qesc", "qesc+weighted+fp-target", "gptq@weighted-pool", ...)."""
    from eacmoe.expert_hessian import EXPERT_HESSIANS

    label, _, policy = label.partition("@")
    method, *options = label.split("+")
    config = {"method": method, "expert_hessian": "routed", "sparse_expert_policy": policy or "pool"}
    for option in options:
        if option in EXPERT_HESSIANS:
            config["expert_hessian"] = option
        elif option == "fp-target" or option.startswith("fp-target:"):
            config["gptq_target"] = "fp" + option.removeprefix("fp-target")
        elif option == "mse-grid":
            config["grid"] = "mse"
        elif option == "act-order":
            config["act_order"] = True
        else:
            raise SystemExit(f"method label {label!r}: unknown option {option!r} (an expert Hessian "
                             f"{', '.join(EXPERT_HESSIANS)}, mse-grid, act-order, or fp-target[:A])")
    return config


def label_base(label: str) -> str:
    """What a variant is paired against: the label without its sparse-expert policy ("gptq@rtn" -> "gptq", the
    default pool), else without its last option ("qesc+weighted+fp-target" -> "qesc+weighted")."""
    if "@" in label:
        return label.partition("@")[0]
    return label.rpartition("+")[0] if "+" in label else label


def _method_rank(label: str) -> tuple[int, int, str]:
    base, _, policy = label.partition("@")
    rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, list(SPARSE_EXPERT_POLICIES).index(policy) if policy in SPARSE_EXPERT_POLICIES else -1, label)


@dataclass(frozen=True)
class AutoBits:
    """A label ``auto:B[+experts][+proxy]``: `--bits auto:B` per layer (the CLI's `--no-per-expert-bits`; the labels
    predate per expert becoming the CLI's default), per routed expert with ``+experts``, the sensitivities from the
    in-run proxy on each seed's calibration tokens with ``+proxy`` (what the CLI does without `--sensitivity`)
    instead of the model's --sensitivity file."""
    budget: str
    per_expert: bool = False
    proxy: bool = False

    FLAGS = ("experts", "proxy")

    @classmethod
    def parse(cls, bits: str) -> "AutoBits | None":
        """The label's parts, or None for a label that is not ``auto:``; ValueError for an unknown suffix."""
        if not str(bits).startswith("auto:"):
            return None
        budget, *flags = bits.removeprefix("auto:").split("+")
        unknown = set(flags) - set(cls.FLAGS)
        if unknown or len(set(flags)) != len(flags):
            raise ValueError(f"bits label {bits!r}: the suffixes after auto:B are +experts and +proxy")
        return cls(budget, "experts" in flags, "proxy" in flags)

    @property
    def label(self) -> str:
        return f"auto:{self.budget}" + "+experts" * self.per_expert + "+proxy" * self.proxy


def _bits_rank(bits: str) -> tuple[float, str]:
    """Sort key of a bits label: numbers by value, "auto:B" right after B, its "+experts" / "+proxy" variants after
    it, explicit schedules last."""
    auto = AutoBits.parse(bits)
    try:
        return (float(auto.budget if auto else bits), bits)
    except ValueError:
        return (math.inf, bits)


def short_bits(bits: str) -> str:
    """A bits label for the tables: an explicit per-layer or per-module schedule with runs of one width written
    ``2x32`` and one entry for all layers when they are equal ("4:2x32 (all 8 layers)")."""
    if "," not in bits:
        return bits

    def entry(text: str) -> str:
        shared, colon, routed = text.rpartition(":")
        widths = routed.split("/")
        return f"{shared}{colon}{widths[0]}x{len(widths)}" if len(widths) > 1 and len(set(widths)) == 1 else text
    entries = [entry(e) for e in bits.split(",")]
    return f"{entries[0]} (all {len(entries)} layers)" if len(set(entries)) == 1 else ",".join(entries)


DOMAINS = ("sotu", "brown", "shakespeare", "pydoc")


def evaluate(fp_model, q_model, tokenizer, heldout: dict, references: dict, args, suite: bool = True) -> dict:
    row = {}
    for source, ids in heldout.items():
        rep = measure_expert_shift(fp_model, q_model, ids, batch_size=8, reference=references[source])
        row[source] = {"ppl": rep.perplexity, "kl": rep.kl_from_fp, "shift": rep.mean_shift(),
                       "shift_per_layer": [layer["any"] for layer in rep.shift]}
    if suite and args.suite_tasks and args.suite_limit != 0:
        from run_suite import evaluate_model_object, summarize

        row["suite"] = summarize(evaluate_model_object(q_model, tokenizer, args.suite_tasks, limit=args.suite_limit,
                                                       batch_size=args.suite_batch_size))
    return row


def restore_fp_routers(q_model, fp_model) -> None:
    adapter = get_adapter(q_model)
    for q_layer, fp_layer in zip(adapter.decoder_layers(q_model), adapter.decoder_layers(fp_model)):
        q_block, fp_block = adapter.moe_block(q_layer), adapter.moe_block(fp_layer)
        if q_block is not None:
            adapter.router_weight(q_block).data.copy_(adapter.router_weight(fp_block).data)


def checkpoint_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's weights: results measured on another checkpoint must never be resumed into a
    table of this one (the bundled models may be retrained; the row keys name the model, not its weights)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_same_checkpoint(rows: list[dict], model_name: str, fingerprint: str, results_path: Path) -> None:
    stale = {r.get("checkpoint") for r in rows if r["key"]["model"] == model_name} - {fingerprint}
    if stale:
        raise SystemExit(f"{results_path} holds {model_name} rows measured on other weights (checkpoint "
                         f"{', '.join(sorted(str(c) for c in stale))}, this one is {fingerprint}); move the file "
                         "aside or pass another --out")


def check_same_threads(rows: list[dict], threads: int, results_path: Path) -> None:
    """Rows measured with another torch thread count (or with none recorded) must not be paired with new ones."""
    other = {r.get("threads") for r in rows} - {threads}
    if other:
        counts = ", ".join(sorted("not recorded" if t is None else str(t) for t in other))
        raise SystemExit(f"{results_path} holds rows measured with {counts} torch thread(s), this run uses {threads}; "
                         "pass the same --threads, move the file aside or pass another --out")


def run(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    rows = load_rows(results_path) if results_path.exists() else []
    check_same_threads(rows, args.threads, results_path)
    done = {json.dumps(r["key"]) for r in rows}
    for i, model_name in enumerate(args.models):
        fp_model, tokenizer = load_model(model_name, torch.float32)
        checkpoint = checkpoint_fingerprint(fp_model)
        check_same_checkpoint(rows, model_name, checkpoint, results_path)
        if i == 0:  # every invocation that adds rows, for RESULTS.md (a refused one adds nothing)
            with (args.out / "commands.txt").open("a") as f:
                f.write(args.command + "\n")
        heldout = {s: heldout_sequences(s, tokenizer, args.eval_samples, args.eval_seqlen) for s in ("bundled-test", "wikitext2")
                   if s == "bundled-test" or not args.test_split_only}
        if not args.test_split_only:
            heldout.update({f"bundled-test:{d}": heldout_sequences(f"bundled-test:{d}", tokenizer, args.eval_samples // 4,
                                                                    args.eval_seqlen) for d in DOMAINS})
        heldout = {k: v for k, v in heldout.items() if v is not None}
        references = {k: measure_fp_reference(fp_model, ids, batch_size=8) for k, ids in heldout.items()}  # fp/fp once
        # fail before hours of work, not at the first quantized layer (e.g. tiny-qwen-moe's experts are 64 wide)
        check_group_size_for_model(fp_model, args.group_size)
        fp_key = {"model": model_name, "method": "fp"}
        if json.dumps(fp_key) not in done:
            append(results_path, fp_key, {"checkpoint": checkpoint, "threads": args.threads,
                                          **evaluate(fp_model, copy.deepcopy(fp_model), tokenizer, heldout, references, args)})
        for setting in args.settings:
            for bits in args.bits:
                for method in args.methods:
                    for seed in ([0] if method_config(method)["method"] == "rtn" else args.seeds):
                        key = {"model": model_name, "setting": setting, "bits": bits, "method": method, "seed": seed}
                        if args.min_expert_tokens is not None:  # only then: keys of older rows stay as they were
                            key["min_expert_tokens"] = args.min_expert_tokens
                        if json.dumps(key) in done:
                            continue
                        q_model = copy.deepcopy(fp_model)
                        calib = get_calibration_data("bundled", tokenizer, args.nsamples, args.seqlen, seed=seed)
                        cfg = QuantizeConfig(**schedule_for(bits, fp_model, model_name, args, calib),
                                             attn_bits=SETTINGS[setting], group_size=args.group_size, seed=seed,
                                             min_expert_tokens=args.min_expert_tokens, **method_config(method))
                        t0 = time.perf_counter()
                        quantizer = LayerwiseQuantizer(q_model, cfg)
                        quantizer.run(calib)
                        seconds = time.perf_counter() - t0
                        append(results_path, key, {"checkpoint": checkpoint, "threads": args.threads,
                                                   **evaluate(fp_model, q_model, tokenizer, heldout, references, args),
                                                   "seconds": seconds,
                                                   "average_bits": bits_account(quantizer).paper_average_bits,
                                                   **sparse_counts(quantizer.reports),
                                                   "calibration_tokens": int(calib.numel())})
                        del quantizer
                        if method == "qesc" and not args.no_fp_router_rows:
                            # a diagnostic for the paired router comparison (shift, KL, ppl): no suite run
                            restore_fp_routers(q_model, fp_model)
                            append(results_path, {**key, "method": "qesc-experts+fp-router"},
                                   {"checkpoint": checkpoint, "threads": args.threads,
                                    **evaluate(fp_model, q_model, tokenizer, heldout, references, args, suite=False)})
                        del q_model
    write_markdown(results_path, args.out / "RESULTS.md")


def sparse_counts(reports) -> dict:
    """How many routed experts (over all MoE layers) fell under the sparse-expert threshold, and of how many."""
    moe = [r for r in reports if r.expert_tokens is not None]
    return {"sparse_experts": sum(len(r.sparse_experts) for r in moe),
            "routed_experts": sum(len(r.expert_tokens) for r in moe)}


def schedule_for(bits: str, fp_model, model_name: str, args, calib: torch.Tensor) -> dict:
    """The QuantizeConfig schedule fields of a bits label (`AutoBits`): "auto:B" is allocated per layer from the
    model's sensitivity file, "+experts" per routed expert, "+proxy" from the in-run proxy on `calib`."""
    num_layers = len(get_adapter(fp_model).decoder_layers(fp_model))
    auto = AutoBits.parse(bits)
    if auto is None:  # a uniform, per-layer or explicit per-module schedule (eacmoe.schedule)
        layer_bits, routed = parse_bits_schedule(bits, num_layers)
        return {"expert_bits": layer_bits, "routed_expert_bits": routed}
    from eacmoe.bit_allocation import auto_expert_bits

    spec = f"auto:{auto.budget}"
    if auto.proxy:  # as python -m eacmoe.quantize without --sensitivity
        allocation = auto_expert_bits(spec, fp_model, calib_ids=calib, group_size=args.group_size,
                                      per_expert=auto.per_expert)
    else:
        files = dict(item.split("=", 1) for item in args.sensitivity)
        if model_name not in files:
            raise SystemExit(f"--bits {bits} needs --sensitivity {model_name}=FILE (or the label {bits}+proxy)")
        allocation = auto_expert_bits(spec, fp_model, sensitivity=Path(files[model_name]), per_expert=auto.per_expert)
    log.info("%s: %s (average %.4f over the expert weights)", bits, allocation.schedule, allocation.achieved_average)
    return {"expert_bits": allocation.bits, "routed_expert_bits": allocation.expert_bits}


def append(path: Path, key: dict, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps({"key": key, **row}) + "\n")
    log.info("%s done", key)


def _mean_spread(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if not math.isnan(v)]  # NaN: a source that was not available (e.g. WikiText-2)
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


# (column title, held-out source or "suite", value getter, digits)
COLUMNS = [
    ("test ppl", "bundled-test", lambda e: e["ppl"]["q/q"], 2),
    ("WT2 ppl", "wikitext2", lambda e: e["ppl"]["q/q"], 1),
    *[(f"{d} ppl", f"bundled-test:{d}", lambda e: e["ppl"]["q/q"], 1) for d in DOMAINS],
    ("oracle ppl", "bundled-test", lambda e: e["ppl"]["q/fp"], 2),
    ("FP + q routing ppl", "bundled-test", lambda e: e["ppl"]["fp/q"], 2),
    ("KL(FP‖q) ×1e3", "bundled-test", lambda e: 1e3 * e["kl"]["q/q"], 2),
    ("shift any %", "bundled-test", lambda e: 100 * e["shift"]["any"], 2),
    ("shift half %", "bundled-test", lambda e: 100 * e["shift"]["half"], 2),
    ("shift all %", "bundled-test", lambda e: 100 * e["shift"]["all"], 3),
    ("cloze %", "suite", lambda e: 100 * e["cloze_acc"], 1),
    ("nextsent %", "suite", lambda e: 100 * e["nextsent_acc"], 1),
]
PAIRED = [("Δ shift any (pp)", lambda r: 100 * r["bundled-test"]["shift"]["any"], 2),
          ("Δ KL ×1e3", lambda r: 1e3 * r["bundled-test"]["kl"]["q/q"], 2),
          ("Δ test ppl", lambda r: r["bundled-test"]["ppl"]["q/q"], 2),
          ("Δ WT2 ppl", lambda r: r["wikitext2"]["ppl"]["q/q"] if "wikitext2" in r else float("nan"), 1)]


def _value(row: dict, source: str, get) -> float | None:
    try:
        return get(row[source])
    except KeyError:
        return None


def _pairs(rows: list[dict], runs: list[dict], other: str) -> list[tuple[dict, dict]]:
    """(run, the run of method `other` with the same model, setting, bits and seed) for every run that has one."""
    by_key = {json.dumps(r["key"], sort_keys=True): r for r in rows}
    twins = ((r, by_key.get(json.dumps({**r["key"], "method": other}, sort_keys=True))) for r in runs)
    return [(r, twin) for r, twin in twins if twin is not None]


def summary_table(rows: list[dict], groups: dict[tuple, list[dict]]) -> list[str]:
    """The headline per (model, setting, bits): perplexity, shift and KL of GPTQ vs QESC, and their paired gaps."""
    shift = PAIRED[0][1]
    kl = PAIRED[1][1]
    ppl = PAIRED[2][1]
    lines = ["Summary (test split; Δ = QESC − GPTQ paired by calibration seed, mean ± sd):", "",
             "| model | setting | bits (avg) | FP ppl | RTN ppl | GPTQ ppl | QESC ppl | Δ ppl | oracle ppl (GPTQ) "
             "| shift any % GPTQ → QESC | Δ shift (pp) | KL ×1e3 GPTQ → QESC | Δ KL ×1e3 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, setting, bits, method), qesc in groups.items():
        pairs = _pairs(rows, qesc, "gptq") if method == "qesc" else []
        if not pairs:
            continue
        gptq = [b for _, b in pairs]
        fp = groups.get((model, "fp", "16", "fp"), [])
        rtn = groups.get((model, setting, bits, "rtn"), [])
        average_bits = next((f" ({r['average_bits']:.2f})" for r in qesc if "average_bits" in r), "")
        oracle = [r["bundled-test"]["ppl"]["q/fp"] for r in gptq]
        lines.append(
            f"| {model} | {setting} | {bits}{average_bits} | {_mean_spread([ppl(r) for r in fp], 2)} | "
            f"{_mean_spread([ppl(r) for r in rtn], 2)} | {_mean_spread([ppl(r) for r in gptq], 2)} | "
            f"{_mean_spread([ppl(r) for r in qesc], 2)} | {_mean_spread([ppl(a) - ppl(b) for a, b in pairs], 2)} | "
            f"{_mean_spread(oracle, 2)} | {statistics.mean(shift(r) for r in gptq):.2f} → "
            f"{statistics.mean(shift(r) for r in qesc):.2f} | {_mean_spread([shift(a) - shift(b) for a, b in pairs], 2)} | "
            f"{statistics.mean(kl(r) for r in gptq):.2f} → {statistics.mean(kl(r) for r in qesc):.2f} | "
            f"{_mean_spread([kl(a) - kl(b) for a, b in pairs], 2)} |")
    return lines


def gap_table(rows: list[dict], groups: dict[tuple, list[dict]]) -> list[str]:
    """Per (model, setting, bits): test ppl and KL of every method next to GPTQ and FP, and the share of GPTQ's
    perplexity gap to FP that each closes, (ppl_GPTQ - ppl_method) / (ppl_GPTQ - ppl_FP), paired by seed."""
    ppl, kl = PAIRED[2][1], PAIRED[1][1]
    lines = ["Share of GPTQ's gap to FP closed (test split; per seed (GPTQ − method) / (GPTQ − FP), mean ± sd; "
             "Δ KL = method − GPTQ paired):", "",
             "| model | setting | bits | method | n | test ppl | gap closed % | KL ×1e3 | Δ KL ×1e3 | oracle ppl |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {json.dumps(r["key"], sort_keys=True): r for r in rows}
    cells = sorted({(m, s, b) for (m, s, b, method) in groups if method != "fp"},
                   key=lambda c: (c[0], c[1], _bits_rank(c[2])))
    for model, setting, bits in cells:
        fp = groups.get((model, "fp", "16", "fp"), [])
        if not fp:
            continue
        fp_ppl = ppl(fp[0])
        lines.append(f"| {model} | {setting} | {bits} | FP | 1 | {fp_ppl:.2f} | 100 | 0 | – | – |")
        methods = sorted({method for (m, s, b, method) in groups if (m, s, b) == (model, setting, bits)},
                         key=_method_rank)
        # GPTQ at the same bits and, for auto:B, also GPTQ with the paper's B schedule: the plain baseline at the
        # same average bits
        baselines = [bits] if (model, setting, bits, "gptq") in groups else []
        if (auto := AutoBits.parse(bits)) is not None:
            baselines.append(auto.budget)
        for gptq_bits in baselines:
            for method in methods:
                runs = groups[(model, setting, bits, method)]
                pairs = [(r, g) for r in runs if (g := by_key.get(json.dumps(
                    {**r["key"], "method": "gptq", "bits": gptq_bits}, sort_keys=True))) is not None]
                if not pairs or method == "rtn":
                    continue
                closed = [100 * (ppl(g) - ppl(r)) / (ppl(g) - fp_ppl) for r, g in pairs]
                oracle = [r["bundled-test"]["ppl"]["q/fp"] for r in runs]
                label = method if gptq_bits == bits else f"{method} (vs GPTQ at {gptq_bits})"
                lines.append(f"| {model} | {setting} | {bits} | {label} | {len(pairs)} | "
                             f"{_mean_spread([ppl(r) for r, _ in pairs], 2)} | {_mean_spread(closed, 1)} | "
                             f"{_mean_spread([kl(r) for r, _ in pairs], 2)} | "
                             f"{_mean_spread([kl(r) - kl(g) for r, g in pairs], 2)} | {_mean_spread(oracle, 2)} |")
    return lines


def variant_table(rows: list[dict]) -> list[str]:
    """Paired differences of the new options: `qesc+weighted − qesc` (the same bits), `gptq+weighted − gptq`,
    `qesc+fp-target − qesc`, `qesc+weighted+fp-target − qesc+weighted`, and
    `auto:B − B` (the same method, the allocated schedule against the paper's)."""
    ppl, kl = PAIRED[2][1], PAIRED[1][1]
    by_key = {json.dumps(r["key"], sort_keys=True): r for r in rows}
    lines = ["Paired differences of the new options (same model, setting and calibration seed; mean ± sd over seeds):",
             "", "| model | setting | comparison | n | Δ test ppl | Δ KL ×1e3 | Δ oracle ppl |", "|---|---|---|---|---|---|---|"]
    found: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in rows:
        k = r["key"]
        if k["method"] == "fp":
            continue
        twins = []
        base = label_base(k["method"])
        if base != k["method"] and k["method"] != "qesc-experts+fp-router":
            twins.append(({**k, "method": base}, f"{k['bits']}: {k['method']} − {base}"))
        if (auto := AutoBits.parse(k["bits"])) is not None:
            twins.append(({**k, "bits": auto.budget}, f"{k['method']}: {k['bits']} − {auto.budget} (paper schedule)"))
            if auto.per_expert:
                per_layer = replace(auto, per_expert=False).label
                twins.append(({**k, "bits": per_layer}, f"{k['method']}: {k['bits']} − {per_layer} (per layer)"))
            if auto.proxy:
                with_file = replace(auto, proxy=False).label
                twins.append(({**k, "bits": with_file}, f"{k['method']}: {k['bits']} − {with_file} (the file)"))
        for twin_key, label in twins:
            twin = by_key.get(json.dumps(twin_key, sort_keys=True))
            if twin is not None:
                found.setdefault((k["model"], k["setting"], label), []).append((r, twin))
    for (model, setting, label), pairs in sorted(found.items()):
        oracle = [a["bundled-test"]["ppl"]["q/fp"] - b["bundled-test"]["ppl"]["q/fp"] for a, b in pairs]
        lines.append(f"| {model} | {setting} | {label} | {len(pairs)} | "
                     f"{_mean_spread([ppl(a) - ppl(b) for a, b in pairs], 3)} | "
                     f"{_mean_spread([kl(a) - kl(b) for a, b in pairs], 2)} | {_mean_spread(oracle, 3)} |")
    return lines


def sparse_policy_table(rows: list[dict]) -> list[str]:
    """Per sparse-expert policy (method labels "<label>@<policy>", the label alone = pool): how many routed experts it
    treated (fell under its threshold; summed over MoE layers, mean over seeds), and its test ppl and KL paired by
    seed with the same label under pool."""
    ppl, kl = PAIRED[2][1], PAIRED[1][1]
    by_key = {json.dumps(r["key"], sort_keys=True): r for r in rows}
    policy_rows = [r for r in rows if "@" in r["key"]["method"]]
    if not policy_rows:
        return []
    lines = ["Sparse-expert policies (`--sparse-expert-policy`; `@policy` against the same method under the default "
             "pool, paired by seed; treated = experts under the policy's threshold, summed over MoE layers, mean over "
             "seeds, of all routed experts):", "",
             "| model | setting | bits | min tokens | method | policy | n | treated | test ppl | Δ test ppl | KL ×1e3 "
             "| Δ KL ×1e3 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cells: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in policy_rows:
        k = r["key"]
        label, _, policy = k["method"].partition("@")
        pool = by_key.get(json.dumps({**k, "method": label}, sort_keys=True))
        if pool is not None:
            cells.setdefault((k["model"], k["setting"], k["bits"], k.get("min_expert_tokens", "width"), label,
                              policy), []).append((r, pool))
    shown: set[tuple] = set()
    for (model, setting, bits, min_tokens, label, policy), pairs in sorted(
            cells.items(), key=lambda c: (tuple(map(str, c[0][:4])), _method_rank(f"{c[0][4]}@{c[0][5]}"))):
        def treated(rs: list[dict]) -> str:
            counts = [r["sparse_experts"] for r in rs if "sparse_experts" in r]
            return f"{statistics.mean(counts):.1f} / {rs[0]['routed_experts']}" if counts else "–"
        if (model, setting, bits, min_tokens, label) not in shown:  # the pool row every policy is paired with
            shown.add((model, setting, bits, min_tokens, label))
            pools = [b for _, b in pairs]
            lines.append(f"| {model} | {setting} | {bits} | {min_tokens} | {label} | pool | {len(pools)} | "
                         f"{treated(pools)} | {_mean_spread([ppl(b) for b in pools], 2)} | – | "
                         f"{_mean_spread([kl(b) for b in pools], 2)} | – |")
        lines.append(f"| {model} | {setting} | {bits} | {min_tokens} | {label} | {policy} | {len(pairs)} | "
                     f"{treated([a for a, _ in pairs])} | {_mean_spread([ppl(a) for a, _ in pairs], 2)} | "
                     f"{_mean_spread([ppl(a) - ppl(b) for a, b in pairs], 3)} | "
                     f"{_mean_spread([kl(a) for a, _ in pairs], 2)} | "
                     f"{_mean_spread([kl(a) - kl(b) for a, b in pairs], 2)} |")
    return lines


def load_rows(results_path: Path) -> list[dict]:
    """The rows of results.jsonl, one per key: when two processes sharing the file computed the same key (e.g. a
    model's FP row), the later row wins."""
    rows = [json.loads(line) for line in results_path.read_text().splitlines() if line]
    return list({json.dumps(r["key"], sort_keys=True): r for r in rows}.values())


def write_markdown(results_path: Path, md_path: Path) -> None:
    rows = [{**r, "key": {**r["key"], "bits": short_bits(r["key"]["bits"])}} if "bits" in r["key"] else r
            for r in load_rows(results_path)]
    commands_path = results_path.with_name("commands.txt")
    commands = list(dict.fromkeys(commands_path.read_text().splitlines())) if commands_path.exists() else []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        k = r["key"]
        groups.setdefault((k["model"], k.get("setting", "fp"), str(k.get("bits", "16")), k["method"]), []).append(r)
    settings = ["fp", *SETTINGS]
    groups = dict(sorted(groups.items(), key=lambda g: (g[0][0], settings.index(g[0][1]), _bits_rank(g[0][2]),
                                                        _method_rank(g[0][3]))))
    threads = sorted({"not recorded" if r.get("threads") is None else str(r["threads"]) for r in rows})
    lines = ["Produced by (rows appended by each command in turn; `--report-only` rewrites this file):", "",
             *[f"    {c}" for c in commands], "", f"Torch CPU threads of the rows: {', '.join(threads)}.", "",
             "Mean ± sample standard deviation over calibration seeds (n). test ppl, KL and shift rates on the bundled "
             "test split, per-domain ppl on each domain's test documents, WT2 = WikiText-2 test; oracle = the quantized "
             "model with the FP model's routing forced; shift = share of tokens whose top-k set changed against the FP "
             "model (any / at least half / all of the k), averaged over MoE layers. `qesc-experts+fp-router` = the QESC "
             "model with its routers reset to FP (same quantized experts).", "",
             *summary_table(rows, groups), "",
             "Share of GPTQ's perplexity gap to FP that each method closes, paired by seed: [GAP.md](GAP.md).", "",
             "All columns:", "",
             "| model | setting | bits | avg bits | method | n | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(COLUMNS)]
    for (model, setting, bits, method), rs in groups.items():
        cells = [_mean_spread([v for r in rs if (v := _value(r, src, get)) is not None], digits)
                 for _, src, get, digits in COLUMNS]
        average_bits = next((f"{r['average_bits']:.2f}" for r in rs if "average_bits" in r), "–")
        lines.append(f"| {model} | {setting} | {bits} | {average_bits} | {method} | {len(rs)} | "
                     + " | ".join(cells) + " |")

    lines += ["", "Paired differences, per calibration seed (same calibration tokens; mean ± sd of the differences):",
              "`qesc − gptq`: router calibration and experts quantized with the calibrated routing vs plain GPTQ; "
              "`qesc − same experts, FP router`: the calibrated router's own effect on the very same quantized experts.",
              "", "| model | setting | bits | comparison | n | " + " | ".join(c[0] for c in PAIRED) + " |",
              "|---|---|---|---|---|" + "---|" * len(PAIRED)]
    for (model, setting, bits, method), rs in groups.items():
        if method != "qesc":
            continue
        for other, label in (("gptq", "qesc − gptq"), ("qesc-experts+fp-router", "qesc − same experts, FP router"),
                             ("qesc-mse", "qesc − qesc-mse")):
            pairs = _pairs(rows, rs, other)
            if not pairs:
                continue
            cells = [_mean_spread([get(a) - get(b) for a, b in pairs], digits) for _, get, digits in PAIRED]
            lines.append(f"| {model} | {setting} | {bits} | {label} | {len(pairs)} | " + " | ".join(cells) + " |")
    lines += ["", "![shift and KL per method](shift.png)", "",
              "![shift per layer](shift_per_layer.png)", ""]
    md_path.write_text("\n".join(lines) + "\n")
    sparse = sparse_policy_table(rows)
    md_path.with_name("GAP.md").write_text("\n".join([*gap_table(rows, groups), "", *variant_table(rows), "",
                                                      *([*sparse, ""] if sparse else [])]) + "\n")
    plot_shift(groups, md_path.with_name("shift.png"))
    plot_shift_per_layer(groups, md_path.with_name("shift_per_layer.png"))


def plot_shift(groups: dict[tuple, list[dict]], path: Path) -> None:
    """Shift rate (any of top-k changed) and KL per method: one panel per model and setting, bits on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(m, s) for (m, s, _b, method) in groups if method != "fp"})
    if not panels:
        return
    methods = METHOD_ORDER[1:]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 6.5), squeeze=False)
    for col, (model, setting) in enumerate(panels):
        bits = sorted({b for (m, s, b, _) in groups if (m, s) == (model, setting)}, key=_bits_rank)
        for row, (title, get) in enumerate((("shift any %", lambda r: 100 * r["bundled-test"]["shift"]["any"]),
                                            ("KL(FP‖q) ×1e3", lambda r: 1e3 * r["bundled-test"]["kl"]["q/q"]))):
            ax = axes[row][col]
            width = 0.8 / len(methods)
            for i, method in enumerate(methods):
                means, sds, xs = [], [], []
                for j, b in enumerate(bits):
                    vals = [get(r) for r in groups.get((model, setting, b, method), [])]
                    if vals:
                        xs.append(j + (i - len(methods) / 2 + 0.5) * width)
                        means.append(statistics.mean(vals))
                        sds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
                if xs:
                    ax.bar(xs, means, width, yerr=sds, capsize=2, label=method)
            ax.set_xticks(range(len(bits)), [f"{b}-bit" for b in bits])
            ax.set_title(f"{model}, {setting}: {title}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shift_per_layer(groups: dict[tuple, list[dict]], path: Path) -> None:
    """Per MoE layer, the share of tokens with a changed top-k set (mean over seeds): one panel per model, setting
    and bit width, one line per method. Errors carried in from earlier layers make it grow with depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(m, s, b) for (m, s, b, method) in groups if method != "fp"}, key=lambda p: (p[0], p[1], _bits_rank(p[2])))
    panels = [p for p in panels if any("shift_per_layer" in r["bundled-test"] for meth in ("gptq", "qesc")
                                       for r in groups.get((*p, meth), []))]
    if not panels:
        return
    columns = sorted({b for (_, _, b) in panels}, key=_bits_rank)
    rows = sorted({(m, s) for (m, s, _) in panels})
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(4 * len(columns), 2.8 * len(rows)), squeeze=False)
    for (model, setting, bits) in panels:
        ax = axes[rows.index((model, setting))][columns.index(bits)]
        for method in METHOD_ORDER[1:]:
            curves = [r["bundled-test"]["shift_per_layer"] for r in groups.get((model, setting, bits, method), [])
                      if "shift_per_layer" in r["bundled-test"]]
            if curves:
                mean = [100 * statistics.mean(layer) for layer in zip(*curves)]
                ax.plot(range(len(mean)), mean, marker="o", markersize=3, label=method)
        ax.set_title(f"{model}, {setting}, {bits}-bit", fontsize=9)
        ax.set_xlabel("MoE layer", fontsize=8)
        ax.set_ylabel("shift any %", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen-moe"], help="bundled names or paths")
    ap.add_argument("--bits", nargs="+", default=["2", "2.5", "3"],
                    help="expert bit schedules: 2, 2.5, 3, a per-layer list, auto:B (per layer: the CLI's "
                         "--no-per-expert-bits, from --sensitivity), auto:B+experts (per routed expert, the CLI's "
                         "default); +proxy after either: from the in-run proxy on each seed's calibration tokens (the "
                         "CLI without --sensitivity) instead of the file")
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "qesc", "qesc-mse"],
                    help="method labels: <method>[+<expert Hessian>][+mse-grid][+act-order][+fp-target[:A]]"
                         "[@<sparse expert policy>], e.g. gptq, qesc+weighted, qesc+mse-grid+act-order, "
                         "qesc+fp-target:0.25, gptq@rtn (without @: the default policy, pool)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="calibration seeds")
    ap.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["experts", "attn4"],
                    help="experts: attention stays FP; attn4: attention 4-bit too")
    ap.add_argument("--group-size", type=int, default=128, help="GPTQ group size")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    ap.add_argument("--min-expert-tokens", type=int, default=None,
                    help="the sparse-expert threshold of every run (default: each expert's input width); recorded in "
                         "the row keys. Method labels choose the policy: gptq@rtn, qesc@weighted-pool, ...")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration sequence length (the bundled models' context)")
    ap.add_argument("--eval-samples", type=int, default=64, help="held-out sequences per source")
    ap.add_argument("--eval-seqlen", type=int, default=256, help="held-out sequence length (the bundled models' context)")
    ap.add_argument("--suite-tasks", default="eacmoe_cloze,eacmoe_nextsent",
                    help="lm-eval tasks run on every quantized model (comma list; perplexities come from the held-out "
                         "streams already: bundled test split and WikiText-2)")
    ap.add_argument("--suite-limit", type=float, default=None,
                    help="items per suite task (0 skips the lm-eval suite; default: all)")
    ap.add_argument("--suite-batch-size", type=int, default=16,
                    help="lm-eval batch size (results equal batch size 1 within float rounding; ~1.6x faster on CPU)")
    ap.add_argument("--test-split-only", action="store_true",
                    help="evaluate on the bundled test split only (no WikiText-2, no per-domain windows): ~3x faster")
    ap.add_argument("--no-fp-router-rows", action="store_true",
                    help="skip the diagnostic rows of QESC models with their routers reset to FP (one evaluation each)")
    ap.add_argument("--sensitivity", nargs="+", default=[], metavar="MODEL=FILE",
                    help="sensitivity.json per model (python -m eacmoe.eval --sensitivity), for --bits auto:B")
    add_threads_argument(ap)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "qesc_results", help="output directory")
    ap.add_argument("--report-only", action="store_true", help="only rewrite RESULTS.md and shift.png from results.jsonl")
    args = ap.parse_args(argv)
    labels = []
    for bits in args.bits:
        try:
            auto = AutoBits.parse(bits)
        except ValueError as exc:
            ap.error(str(exc))
        labels.append(auto.label if auto else bits)  # one spelling per label: rows pair by it
    args.bits = labels
    args.command = command_line("python scripts/qesc_experiments.py", sys.argv[1:] if argv is None else argv,
                                args.threads)
    args.suite_tasks = [t for t in args.suite_tasks.split(",") if t]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.report_only:
        write_markdown(args.out / "results.jsonl", args.out / "RESULTS.md")
    else:
        args.threads = set_threads(args.threads)
        run(args)


if __name__ == "__main__":
    main()
