"""The GPTQ solver against an earlier version of itself: the same output, CPU time per matrix.

    python scripts/bench_gptq_solver.py --baseline 686b395 --threads 1
    python scripts/bench_gptq_solver.py --baseline 24306fb --experts 8 --threads 1
    python scripts/bench_gptq_solver.py --baseline c891634 --shapes real --repeats 1 --threads 1

The baseline's ``eacmoe/quant/gptq.py`` is read from git (``git show <commit>:eacmoe/quant/gptq.py``) and imported
beside the current one. For each shape both solvers get the same Hessian (of correlated random inputs) and weight;
codes, scales, zeros, g_idx and loss must be identical (both grid timings) or, for a baseline with other fp32
arithmetic (before the inverse-free factorisation), agree like two GPTQ implementations do: the loss within 1%
(a flipped code changes the rest of its row, so on 14336 columns only ~93% of the codes stay equal at 0.02% of
loss); else the script stops with an error. The share of equal codes is printed per shape.
Times are CPU seconds (``time.process_time``), best of --repeats, for one matrix on a fresh solver (factorisation
included) and for a pair of matrices on one solver (an expert's gate and up projections share their input).
A column more times the working tree's solver with ``--grid mse`` (the range search, eacmoe/quant/grid.py) on the
same matrix. With ``--experts E`` (E > 1) a third pair of columns: E experts' gate and up projections (E solvers, 2E matrices)
quantized one matrix at a time by the baseline and in one column loop by ``quantize_together`` (also checked
identical, matrix by matrix); factorisations are done before timing, so the columns compare the loops.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (rows, columns, group size, bits, act_order, sym): the bundled models' shapes, then larger ones
SHAPES = [(256, 256, 64, 2, False, False), (128, 256, 64, 2, False, False), (256, 256, 128, 4, False, False),
          (64, 256, 64, 2, False, False), (512, 256, 64, 2, True, True), (256, 512, 32, 3, False, True),
          (1024, 1024, 128, 4, False, False), (2048, 512, 64, 3, True, False)]
# One expert's matrices of the users' models: Mixtral-8x7B's gate (= up) and down, Qwen3-30B-A3B's gate and down
REAL_SHAPES = [(14336, 4096, 64, 2, False, False), (4096, 14336, 64, 2, False, False),
               (768, 2048, 64, 2, False, False), (2048, 768, 64, 2, False, False)]
LOSS_RTOL = 0.01


def load_baseline(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:eacmoe/quant/gptq.py"], cwd=REPO, capture_output=True,
                            text=True)
    if source.returncode != 0:
        raise SystemExit(f"error: --baseline {commit}: {source.stderr.strip()}")
    path = Path(f"/tmp/eacmoe_gptq_{commit}.py")
    path.write_text(source.stdout.replace("from .grid import", "from eacmoe.quant.grid import"))
    spec = importlib.util.spec_from_file_location(f"eacmoe_gptq_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.GPTQ


def _hessian(cols: int, g, samples: int):
    """The Hessian of `samples` correlated random inputs."""
    import torch

    from eacmoe.quant import GPTQ

    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
    solver = GPTQ(cols)
    solver.add_batch(torch.randn(samples, cols, generator=g) @ mix)
    return solver.H.clone()


def _same(a, b) -> bool:
    """Identical GPTQ results: codes, scales, zeros, g_idx and loss."""
    import torch

    return all(torch.equal(getattr(a.qweight, k), getattr(b.qweight, k))
               for k in ("codes", "scales", "zeros", "g_idx")) and a.loss == b.loss


def _agreement(a, b) -> tuple[float, float]:
    """(share of equal codes, relative loss difference) of two GPTQ results."""
    equal = float((a.qweight.codes == b.qweight.codes).float().mean())
    return equal, abs(a.loss - b.loss) / max(abs(a.loss), 1e-30)


def _check(a, b, where: str) -> str:
    """'identical', or the agreement of two results that are equivalent; stops the script otherwise."""
    if _same(a, b):
        return "identical"
    equal, rel = _agreement(a, b)
    if rel > LOSS_RTOL:
        raise SystemExit(f"error: results differ at {where}: {equal:.2%} of codes equal, loss {rel:.2%} apart")
    return f"{equal:.2%} codes, loss {rel:.3%}"


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    from eacmoe.threads import add_threads_argument

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="686b395", help="git commit of the solver to compare against")
    add_threads_argument(p)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (the best is kept)")
    p.add_argument("--shapes", choices=("bundled", "real"), default="bundled",
                   help="bundled: the tiny models' shapes and a few larger; real: one expert's gate and down of "
                        "Mixtral-8x7B and Qwen3-30B-A3B (default: bundled)")
    p.add_argument("--experts", type=int, default=1,
                   help="E > 1 adds the columns for E experts' gate+up quantized together (default: 1, no columns)")
    args = p.parse_args(argv)
    import torch

    from eacmoe.quant import GPTQ, QuantSpec
    from eacmoe.quant.gptq import quantize_together

    torch.set_num_threads(args.threads)
    Old = load_baseline(args.baseline)
    g = torch.Generator().manual_seed(0)
    print(f"baseline {args.baseline} vs working tree, {torch.get_num_threads()} thread(s), CPU ms, best of "
          f"{args.repeats}\n")
    experts = args.experts
    layer_head = f" {experts} experts' gate+up: one by one (before) | together | x |" if experts > 1 else ""
    print("| rows x cols | group | bits | act-order | sym | one matrix: before | after | x | gate+up pair: before "
          "| after | x | same output | one matrix, --grid mse | x minmax |" + layer_head)
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|" + ("---:|---:|---:|" if experts > 1 else ""))
    for rows, cols, gs, bits, act, sym in SHAPES if args.shapes == "bundled" else REAL_SHAPES:
        # real shapes: 4096 tokens, about what a Mixtral expert gets of 16 x 512 (fewer than 14336 columns: damped)
        n = 4 * cols if args.shapes == "bundled" else 4096
        H = _hessian(cols, g, n)
        w, w2 = (torch.randn(rows, cols, generator=g) * 0.05 for _ in range(2))
        spec = QuantSpec(bits=bits, group_size=gs, act_order=act, sym=sym)
        agreement = []
        for exact in (False, True) if args.shapes == "bundled" else (False,):
            a = Old.from_hessian(H, n).quantize(w, spec, exact_group_grids=exact)
            b = GPTQ.from_hessian(H, n).quantize(w, spec, exact_group_grids=exact)
            agreement.append(_check(a, b, f"{rows}x{cols} group {gs} bits {bits} act {act} exact_group_grids "
                                          f"{exact}"))

        def pair(cls):
            solver = cls.from_hessian(H, n)
            solver.quantize(w, spec)
            solver.quantize(w2, spec)

        old1 = best(lambda: Old.from_hessian(H, n).quantize(w, spec), args.repeats)
        new1 = best(lambda: GPTQ.from_hessian(H, n).quantize(w, spec), args.repeats)
        mse1 = best(lambda: GPTQ.from_hessian(H, n).quantize(w, replace(spec, grid="mse")), args.repeats)
        old2, new2 = best(lambda: pair(Old), args.repeats), best(lambda: pair(GPTQ), args.repeats)
        layer_cells = ""
        if experts > 1:
            hessians = [H] + [_hessian(cols, g, n) for _ in range(experts - 1)]
            pairs = [(w, w2)] + [tuple(torch.randn(rows, cols, generator=g) * 0.05 for _ in range(2))
                                 for _ in range(experts - 1)]
            olds = [Old.from_hessian(h, n) for h in hessians]
            news = [GPTQ.from_hessian(h, n) for h in hessians]
            for solver in olds + news:  # factorise before timing: the columns compare the column loops
                solver.quantize(w[:1], spec)
            together = quantize_together([s for s in news for _ in range(2)], [m for pr in pairs for m in pr], spec)
            one_by_one = [o.quantize(m, spec) for o, pr in zip(olds, pairs) for m in pr]
            for a, b in zip(one_by_one, together):
                _check(a, b, f"{rows}x{cols} group {gs} bits {bits} (quantize_together)")
            old_e = best(lambda: [o.quantize(m, spec) for o, pr in zip(olds, pairs) for m in pr], args.repeats)
            new_e = best(lambda: quantize_together([s for s in news for _ in range(2)],
                                                   [m for pr in pairs for m in pr], spec), args.repeats)
            layer_cells = f" {old_e * 1e3:.1f} | {new_e * 1e3:.1f} | {old_e / new_e:.2f} |"
        print(f"| {rows} x {cols} | {gs} | {bits} | {act} | {sym} | {old1 * 1e3:.1f} | {new1 * 1e3:.1f} | "
              f"{old1 / new1:.2f} | {old2 * 1e3:.1f} | {new2 * 1e3:.1f} | {old2 / new2:.2f} | "
              f"{'; '.join(agreement)} | {mse1 * 1e3:.1f} | {mse1 / new1:.2f} |" + layer_cells)
    print("\nsame output: codes, scales, zeros, g_idx and loss identical, else the share of equal codes and the "
          "loss difference (both grid timings on the bundled shapes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
