"""How well the in-run proxy of `--bits auto:B` (eacmoe.bit_allocation.proxy_sensitivities) ranks the layers like the
measured sensitivity file (2-bit GPTQ KL per layer), and the auto:B schedules each gives; with --per-expert, the same
for the per-expert sensitivities of `--per-expert-bits` where the file has per-expert cells: the in-run per-module
proxy (proxy_expert_sensitivities) and the file's layer score x selection frequency, against the measured cells.

    python scripts/auto_bits_proxy_check.py --threads 1      # both bundled models, their committed sensitivity.json
    python scripts/auto_bits_proxy_check.py --models tiny-mixtral --per-expert --threads 1

Prints per model the two score vectors, their Spearman rank correlation and the schedules for each budget.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eacmoe.bit_allocation import (  # noqa: E402
    allocation_from_sensitivities,
    layer_expert_params,
    proxy_sensitivities,
    read_sensitivity_file,
)
from eacmoe.calibration import get_calibration_data  # noqa: E402
from eacmoe.threads import add_threads_argument, set_threads  # noqa: E402
from eacmoe.workflow import load_model  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho (no ties expected among real-valued scores)."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-qwen-moe"])
    ap.add_argument("--budgets", nargs="+", default=["auto:2.25", "auto:2.5", "auto:3"])
    ap.add_argument("--nsamples", type=int, default=64, help="calibration sequences of the proxy")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--per-expert", action="store_true",
                    help="also check the per-expert sensitivities against the file's per-expert cells")
    add_threads_argument(ap)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    print(f"torch threads {threads}")
    for name in args.models:
        model, tokenizer = load_model(name, torch.float32)
        group = 64 if name == "tiny-qwen-moe" else 128
        ids = get_calibration_data("bundled", tokenizer, args.nsamples, args.seqlen, seed=0)
        proxy = proxy_sensitivities(model, ids, group_size=group)
        params = layer_expert_params(model)
        measured = read_sensitivity_file(REPO / "docs" / "eval" / name / "sensitivity" / "sensitivity.json", len(params))
        print(f"\n{name}: proxy (x1e3) {[round(1e3 * p, 3) for p in proxy]}")
        print(f"{name}: sensitivity.json KL (x1e3) {[round(1e3 * m, 3) for m in measured]}")
        print(f"{name}: Spearman rho(proxy, measured) = {spearman(proxy, measured):.3f}")
        for budget in args.budgets:
            from_file = allocation_from_sensitivities(budget, params, measured, "file").bits
            from_proxy = allocation_from_sensitivities(budget, params, proxy, "proxy").bits
            print(f"{name} {budget}: file {from_file}  proxy {from_proxy}")
        if args.per_expert:
            check_per_expert(name, model, ids, group, args.budgets)


def check_per_expert(name: str, model, ids, group: int, budgets: list[str]) -> None:
    """Spearman rho of each per-expert proxy against the measured cells, over all (layer, expert) pairs and within
    each layer (mean), and the share of experts whose width the proxy's allocation gives as the file's does."""
    import json
    import statistics

    from eacmoe.bit_allocation import (
        ModuleSensitivity,
        allocate_per_expert,
        layer_modules,
        proxy_expert_sensitivities,
        read_expert_sensitivities,
    )

    path = REPO / "docs" / "eval" / name / "sensitivity" / "sensitivity.json"
    modules = layer_modules(model)
    proxy = proxy_expert_sensitivities(model, ids, group_size=group)
    if any(m.routed and m.rest for m in modules):
        ratios = [p.rest / sum(p.routed) for p, m in zip(proxy, modules) if m.routed and sum(p.routed) > 0]
        print(f"{name}: proxy of the shared experts / sum of the routed experts' proxies, per MoE layer: "
              f"{[round(r, 3) for r in ratios]} (median {statistics.median(ratios):.3f})")
    measured, how = read_expert_sensitivities(path, modules)
    if "per-expert cells in 0 layers" in how:
        print(f"{name}: the file has no per-expert cells; nothing to check per expert")
        return
    doc = json.loads(path.read_text())
    split = [ModuleSensitivity(tuple(layer["score"] * f for f in layer["selection_frequency"]), m.rest)
             for layer, m in zip(doc["layers"], measured)]
    flat = [v for m in measured for v in m.routed]
    for label, scores in (("in-run per-module RTN proxy", proxy), ("layer score x selection frequency", split)):
        within = statistics.mean(spearman(list(a.routed), list(b.routed)) for a, b in zip(scores, measured))
        print(f"{name} per expert, {label}: Spearman rho over all experts {spearman([v for s in scores for v in s.routed], flat):.3f}, "
              f"within a layer (mean over layers) {within:.3f}")
        for budget in budgets:
            ours = allocate_per_expert(budget, modules, scores, label).expert_bits
            file = allocate_per_expert(budget, modules, measured, "file").expert_bits
            same = sum(a == b for x, y in zip(ours, file) for a, b in zip(x, y)) / sum(len(x) for x in file)
            print(f"{name} {budget} per expert, {label}: {100 * same:.0f}% of the experts get the file's width")


if __name__ == "__main__":
    main()
