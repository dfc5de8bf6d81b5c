"""Which matrices GPTQ's column loop takes together (`quant.gptq.quantize_together` runs one loop per list).

Pure Python on purpose: scripts/scaling_law.py loads this file by path to count the pipeline's column steps in a
process that must not import torch.
"""
from __future__ import annotations

from collections.abc import Sequence

# Rows one column loop takes at once (all its members together). Below this the loop is bound by Python dispatch
# (a column step is ~10 torch calls on a few hundred values), so several small matrices in one loop cost about as
# much as one; above it the arithmetic dominates and a bigger loop only adds memory (and loses cache locality).
# Measured with scripts/bench_gptq_solver.py --experts 8: 8 experts of 128 x 256 in loops of 1024 rows 3.4x faster
# than one by one, 1536 x 2048 (Qwen3-30B-A3B's gate+up) not faster in loops of 2.
GPTQ_LOOP_ROWS = 1024


def column_loops(matrices: Sequence[tuple[object, tuple[int, ...]]], loop_rows: int = GPTQ_LOOP_ROWS) -> list[list[int]]:
    """Split matrices (solver, shape), in order, into the index lists that `quantize_together` runs as one loop
    each: consecutive matrices of one solver are stacked while their rows fit in `loop_rows` (else each is a loop
    of its own, so a large matrix costs no more memory than alone), and consecutive solvers with equal stacked
    shapes share a loop while the loop's rows fit in `loop_rows`."""
    members: list[tuple[object, list[int], int, int]] = []  # solver, indices, stacked rows, columns
    for i, (solver, shape) in enumerate(matrices):
        if members and members[-1][0] is solver and members[-1][2] + shape[0] <= loop_rows:
            solver_, indices, rows, cols = members[-1]
            members[-1] = (solver_, indices + [i], rows + shape[0], cols)
        else:
            members.append((solver, [i], shape[0], shape[1]))
    loops: list[list[int]] = []
    loop_shape, loop_rows_used = None, 0
    for _solver, indices, rows, cols in members:
        if loops and loop_shape == (rows, cols) and loop_rows_used + rows <= loop_rows:
            loops[-1].extend(indices)
            loop_rows_used += rows
        else:
            loops.append(list(indices))
            loop_shape, loop_rows_used = (rows, cols), rows
    return loops
