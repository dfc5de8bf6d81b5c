"""How well the in-run proxy of `--bits auto:B` (eacmoe.bit_allocation.proxy_sensitivities) ranks the layers like the
measured sensitivity file (2-bit GPTQ KL per layer), and the auto:B schedules each gives.

    python scripts/auto_bits_proxy_check.py --threads 1      # both bundled models, their committed sensitivity.json

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


if __name__ == "__main__":
    main()
