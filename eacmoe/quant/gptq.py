"""A self-contained GPTQ solver (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"), written for this project.

The solver only needs the inputs seen by one linear map ``y = x W^T``: it accumulates the layer
Hessian ``H = 2/n * sum_t x_t x_t^T`` and then quantizes ``W`` column by column, spreading each column's
rounding error over the not-yet-quantized columns (Optimal Brain Surgeon update).

The updates are those of the GPTQ reference code and GPTQModel 7.6 (their ``quantize`` with ``mse=0``,
``act_group_aware=False``), computed without the inverse Hessian: they push each column's error along the upper
Cholesky factor of ``H^-1``, which is the inverse of the upper factor of ``H = R R^T``, and this solver runs the
loop on ``R`` itself (one Cholesky factorisation of ``H`` with reversed rows and columns, see
:meth:`GPTQ._feedback_factor` and :func:`_solve_columns`): a quarter of the factorisation flops (at Mixtral's
14336-wide down projection, 2.6x faster per matrix) and 16 instead of 25 bytes of workspace per Hessian entry.
With GPTQModel's Hessian the codes agree to fp32 rounding (identical in 305 of 320 cross-check configurations,
else 99.2% or more; tests/test_gptq_vs_gptqmodel.py). Notes:

- Grid timing. A group's min/max grid is fitted when its first column is reached, on the weights *as of the
  start of the current lazy block* (like the reference): columns of the same block that were quantized before
  the group started have not yet pushed their updates into ``W``. When a group starts inside a block
  (``group_size`` not a multiple of ``block_size``, e.g. 64 vs 128) the result therefore depends on
  ``block_size``. ``exact_group_grids=True`` fits the grid on the fully updated weights instead (the textbook
  sequential algorithm; result independent of ``block_size``). Measured on synthetic correlated inputs
  (group 32/64, block 128), the exact variant has 4-6% *higher* proxy loss at 2 bits (the partially updated
  weights have a narrower range, which acts like range clipping) and is within +-2% at 3/4 bits. When every
  group starts at a block boundary (e.g. the paper's group 128 with block 128) both are identical.
- Damping is escalated in x10 steps (with a logged warning) when the Cholesky factorisation fails or a pivot is
  below what fp32 can tell from rounding, instead of GPTQModel's additive grid.
- ``nsamples`` counts rows (tokens), like GPTQModel; the scale of ``H`` does not change the solution.
- Symmetric grids always span ``[-max|w|, max|w|]``; GPTQ/GPTQModel differ only for a group whose values
  are all >= 0, which they would clip to half its range (see :func:`eacmoe.quant.grid.fit_grid`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .column_loops import GPTQ_LOOP_ROWS, column_loops
from .grid import QuantizedWeight, QuantSpec

__all__ = ["GPTQ", "GPTQResult", "MAX_DAMP_PERCENT", "proxy_loss", "quantize_together", "column_loops", "GPTQ_LOOP_ROWS"]

logger = logging.getLogger(__name__)

# Escalation stops here: beyond ~10x the mean diagonal the "Hessian" is essentially the identity (RTN).
MAX_DAMP_PERCENT = 10.0
# Smallest damping (fraction of the mean diagonal) whose pivots fp32 can tell from rounding: below it a pivot is
# only accepted if it is at least half this (see GPTQ._feedback_factor).
PIVOT_FLOOR = 1e-6


class Factorisation(NamedTuple):
    """What the column loop needs of one damped Hessian (see :meth:`GPTQ._feedback_factor`)."""

    perm: torch.Tensor | None      # act-order processing order, or None
    dead: torch.Tensor | None      # bool mask of columns that never saw a non-zero input, or None
    feedback: torch.Tensor         # Z = R diag(r)^-1, upper with unit diagonal, H_d = R R^T (processing order)
    col_scale: torch.Tensor        # r = diag(R): a column's loss is ((w'_j - q_j) r_j)^2 / 2
    damp: float                    # absolute value added to the diagonal
    damp_percent: float            # damp as a fraction of the mean diagonal (escalated if needed)


@dataclass
class GPTQResult:
    """Output of :meth:`GPTQ.quantize`.

    Attributes:
        qweight: the quantized weight (codes, scales, zeros, g_idx).
        loss: sum of the GPTQ per-column losses ``(w_j - q_j)^2 / (2 [U]_jj^2)`` (``U`` the upper Cholesky factor of
            ``H_d^-1``; ``1 / U_jj = r_j``); it equals
            ``0.5 * tr((W - Q) H_d (W - Q)^T)`` with ``H_d`` the damped Hessian (dead columns zeroed).
        damp: absolute value added to the Hessian diagonal.
        damp_percent: the fraction of the mean Hessian diagonal that ``damp`` corresponds to (larger than
            ``spec.damp_percent`` when escalation was needed).
        perm: the column processing order (``act_order``), else ``None``.
        nsamples: number of input rows behind the Hessian.
    """

    qweight: QuantizedWeight
    loss: float
    damp: float
    damp_percent: float
    perm: torch.Tensor | None
    nsamples: int

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[out, in]`` dequantized weight."""
        return self.qweight.dequantize()


def proxy_loss(weight: torch.Tensor, qweight: torch.Tensor, hessian: torch.Tensor) -> float:
    """Layer-output proxy error ``tr((W - Q) H (W - Q)^T)`` in fp64 (for comparing solvers)."""
    delta = (weight.double() - qweight.double())
    return float(torch.einsum("ri,ij,rj->", delta, hessian.double(), delta))


class GPTQ:
    """GPTQ solver for one linear map with ``columns`` input features.

    Usage::

        solver = GPTQ(layer.in_features)
        for x in calibration_inputs:          # x: [..., in_features]
            solver.add_batch(x)
        result = solver.quantize(layer.weight, QuantSpec(bits=4, group_size=128))
        layer.weight.data = result.dequantize().to(layer.weight.dtype)

    ``quantize`` may be called several times (e.g. for several specs); it never modifies the Hessian or the
    caller's weight.
    """

    # fp32 bytes of one input chunk in add_batch (64 MiB: ~1170 tokens of a 14336-wide Mixtral down_proj input)
    max_chunk_bytes: int = 64 * 1024**2

    def __init__(self, columns: int, device: torch.device | str | None = None) -> None:
        if columns < 1:
            raise ValueError(f"columns must be >= 1, got {columns}")
        self.columns = int(columns)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=self.device)
        self._nsamples = 0
        # (act_order, damp_percent) -> the Factorisation of the current Hessian: a solver shared by
        # matrices with the same input (an expert's gate and up projections) factorises once.
        self._factor: tuple[tuple[bool, float], Factorisation] | None = None

    @classmethod
    def from_hessian(
        cls, hessian: torch.Tensor, nsamples: int = 1, device: torch.device | str | None = None
    ) -> "GPTQ":
        """Solver with a given (symmetric) Hessian, e.g. an analytic one in tests or one merged elsewhere."""
        if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
            raise ValueError(f"hessian must be square, got shape {tuple(hessian.shape)}")
        if nsamples < 1:
            raise ValueError(f"nsamples must be >= 1, got {nsamples}")
        solver = cls(hessian.shape[0], device=device if device is not None else hessian.device)
        solver._H = hessian.detach().to(solver.device, torch.float32, copy=True)
        solver._factor = None
        solver._nsamples = int(nsamples)
        return solver

    @property
    def nsamples(self) -> int:
        """Number of input rows (tokens) accumulated so far."""
        return self._nsamples

    @property
    def H(self) -> torch.Tensor:
        """The running-mean Hessian ``2/n * sum x x^T`` (fp32 ``[columns, columns]``; do not modify)."""
        return self._H

    def chunk_rows(self) -> int:
        """Rows of an input converted to fp32 at a time in :meth:`add_batch` (at least 1)."""
        return max(1, self.max_chunk_bytes // (4 * self.columns))

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate inputs ``x`` of shape ``[..., columns]`` (every leading index is one sample).

        The input is converted to fp32 and moved to the solver's device one chunk of rows at a time, so the
        transient memory is about ``2 * max_chunk_bytes`` whatever the number of tokens (a hot Mixtral expert
        at 128 x 2048 calibration tokens would otherwise need two fp32 copies of a [n, 14336] matrix).
        """
        if x.shape[-1] != self.columns:
            raise ValueError(f"input has {x.shape[-1]} features, solver expects columns={self.columns}")
        x = x.detach().reshape(-1, self.columns)
        m = x.shape[0]
        if m == 0:
            return
        self._factor = None  # the Hessian changes: a cached factorisation no longer applies
        total = self._nsamples + m
        # Rescale the old mean instead of summing then dividing: keeps H at O(|x|^2) for any n (fp32-safe).
        self._H.mul_(self._nsamples / total)
        scale = math.sqrt(2.0 / total)
        step = self.chunk_rows()
        for start in range(0, m, step):
            chunk = x[start:start + step].to(self.device, torch.float32) * scale
            self._H.addmm_(chunk.T, chunk)
            del chunk
        self._nsamples = total

    def _feedback_factor(self, H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """The error-feedback matrix ``Z`` and column scales ``r`` of ``H + damp I``, with escalating damping.

        GPTQ needs ``H^-1``'s upper Cholesky factor ``U``; its inverse ``R = U^-1`` is the upper factor of
        ``H = R R^T``, which is one Cholesky factorisation of ``H`` with its rows and columns reversed. Running the
        column loop on ``R`` (see :func:`_solve_columns`) makes the same updates without ever forming ``H^-1``:
        one factorisation (n^3 / 3 flops) instead of a factorisation, an inversion and a second factorisation
        (4 n^3 / 3), and no squaring of the condition number. Returns ``(Z, r, damp, damp_fraction)`` with
        ``r = diag(R)`` and ``Z = R diag(r)^-1`` (unit diagonal). ``H`` is not modified.
        """
        diag_mean = torch.diagonal(H).mean()  # fp32 0-dim, as in GPTQModel, so the damped H matches bit for bit
        if not float(diag_mean) > 0.0:
            logger.warning(
                "GPTQ: mean Hessian diagonal is %.3g (not positive); damping relative to 1.0", float(diag_mean)
            )
            diag_mean = torch.ones((), dtype=H.dtype, device=H.device)
        frac = float(damp_percent)
        while True:
            damp_t = frac * diag_mean
            damp = float(damp_t)
            Hd = H.flip(0, 1)  # a reversed copy: its lower factor L, reversed back, is R (H = R R^T)
            Hd.diagonal().add_(damp_t)
            L, info = torch.linalg.cholesky_ex(Hd)
            del Hd
            # Every pivot R_jj^2 is a Schur complement of H + damp I, so at least damp in exact arithmetic; a smaller
            # one means the damping was lost to fp32 rounding of the diagonal (H singular to working precision): the
            # factor is then of another matrix and its pivots (the loss factors r_j) are noise. Then, as for a
            # failed factorisation, the damping is escalated.
            pivots = torch.diagonal(L).square()
            floor = 0.5 * max(damp, PIVOT_FLOOR * float(diag_mean))
            if int(info) == 0 and bool(torch.isfinite(pivots).all()) and float(pivots.min()) >= floor:
                R = L.flip(0, 1)
                del L
                r = torch.diagonal(R).clone()
                R.div_(r)  # column j / R_jj: Z
                if frac != damp_percent:
                    logger.warning(
                        "GPTQ: Hessian needed damp_percent=%.4g (requested %.4g) to be positive definite",
                        frac,
                        damp_percent,
                    )
                return R, r, damp, frac
            next_frac = frac * 10.0
            if next_frac > MAX_DAMP_PERCENT * (1 + 1e-9):
                raise RuntimeError(
                    f"GPTQ: Hessian is not positive definite even with damp_percent={frac:.4g} "
                    f"(limit {MAX_DAMP_PERCENT}); check the calibration inputs for NaN/inf or use RTN"
                )
            logger.warning(
                "GPTQ: Cholesky failed with damp_percent=%.4g; retrying with %.4g", frac, next_frac
            )
            frac = next_frac

    def _factorisation(self, act_order: bool, damp_percent: float) -> "Factorisation":
        """The factorisation of the current Hessian for these settings; computed once and kept until the Hessian
        changes (``add_batch``), so that a second matrix with the same input reuses it."""
        key = (act_order, damp_percent)
        if self._factor is not None and self._factor[0] == key:
            return self._factor[1]
        if not bool(torch.isfinite(self._H).all()):
            raise ValueError("GPTQ: the Hessian contains NaN or inf")
        H = self._H.clone()
        # Columns that never saw a non-zero input cannot affect the output: pin them to 0, and give H a unit
        # pivot there so the factorisation does not depend on the damping for them.
        dead = torch.diagonal(H) == 0
        if bool(dead.any()):
            H[dead, dead] = 1.0
        else:
            dead = None
        perm = None
        if act_order:
            # stable=True: ties in the diagonal must not make the result run-dependent.
            perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
            H = H[perm][:, perm]
        Z, r, damp, damp_frac = self._feedback_factor(H, damp_percent)
        del H
        self._factor = (key, Factorisation(perm, dead, Z, r, damp, damp_frac))
        return self._factor[1]

    def loop_input(self, weight: torch.Tensor, spec: QuantSpec) -> tuple["GPTQ", torch.Tensor]:
        """(the solver, the matrix) that :func:`quantize_together` runs for ``weight``: the weight itself here; a
        solver with another target (quant/asymmetric.py) returns its inner GPTQ solver and that target."""
        return self, weight

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, spec: QuantSpec, *, exact_group_grids: bool = False) -> GPTQResult:
        """Quantize ``weight`` ``[rows, columns]`` with GPTQ under ``spec``.

        Args:
            weight: the FP weight; not modified.
            spec: bits, group size, symmetry, act-order, damping and block size.
            exact_group_grids: fit each group's grid on the fully updated weights rather than on the weights
                as of the current block start (reference behaviour); see the module docstring.

        All math is fp32 on the solver's device; the returned ``QuantizedWeight`` lives there too.
        """
        return quantize_together([self], [weight], spec, exact_group_grids=exact_group_grids)[0]


@torch.no_grad()
def quantize_together(solvers: Sequence[GPTQ], weights: Sequence[torch.Tensor], spec: QuantSpec, *,
                      exact_group_grids: bool = False) -> list[GPTQResult]:
    """GPTQ of several matrices in one column loop; the same results as ``solvers[i].quantize(weights[i], spec)``
    bit for bit, in a fraction of the Python steps.

    Matrices that share a solver (the same input: an expert's gate and up, attention's q, k and v) are stacked
    by rows, since GPTQ treats every row independently given the factorisation; different solvers (the experts
    of a layer) become a leading batch dimension of the loop and need equal stacked shapes. On small and
    mid-size matrices the loop is dispatch-bound (one column of a few hundred rows per step), so a layer's 128
    Qwen3 experts x 3 matrices cost about as many Python steps as one matrix each of gate+up and down.
    Memory: every batch member's fp32 weight, codes and losses at once (12 x rows x columns bytes each) and,
    with more than one solver, a stacked copy of their feedback matrices (4 x columns^2 bytes each): the caller
    bounds the batch (see ``pipeline``).
    """
    if len(solvers) != len(weights) or not solvers:
        raise ValueError(f"need one solver per weight (got {len(solvers)} solvers, {len(weights)} weights)")
    members: list[GPTQ] = []                      # distinct solvers in first-use order
    rows_of: dict[int, list[int]] = {}            # id(solver) -> indices of its weights, in order
    for i, (solver, weight) in enumerate(zip(solvers, weights)):
        if weight.dim() != 2 or weight.shape[1] != solver.columns:
            raise ValueError(f"weight must be [rows, {solver.columns}], got shape {tuple(weight.shape)}")
        if solver._nsamples == 0:
            raise ValueError("GPTQ: no calibration samples were added (nsamples == 0)")
        if id(solver) not in rows_of:
            members.append(solver)
            rows_of[id(solver)] = []
        rows_of[id(solver)].append(i)
    stacked_rows = {sum(weights[i].shape[0] for i in rows_of[id(s)]) for s in members}
    if len({s.columns for s in members}) != 1 or len(stacked_rows) != 1 or len({s.device for s in members}) != 1:
        raise ValueError("matrices quantized together need equal columns, equal rows per solver and one device")
    device = members[0].device
    factors = [s._factorisation(bool(spec.act_order), float(spec.damp_percent)) for s in members]

    rows = stacked_rows.pop()
    W = torch.empty(len(members), rows, members[0].columns, dtype=torch.float32, device=device)
    for b, (solver, (perm, dead, *_rest)) in enumerate(zip(members, factors)):
        r0 = 0
        for i in rows_of[id(solver)]:
            W[b, r0:r0 + weights[i].shape[0]] = weights[i].detach()
            r0 += weights[i].shape[0]
        if dead is not None:
            W[b][:, dead] = 0.0
        if perm is not None:
            W[b] = W[b][:, perm]
    if len(factors) > 1:
        Z = torch.stack([f.feedback for f in factors])
        r = torch.stack([f.col_scale for f in factors])
    else:
        Z, r = factors[0].feedback.unsqueeze(0), factors[0].col_scale.unsqueeze(0)
    codes, scales, zeros, losses = _solve_columns(W, Z, r, spec, exact_group_grids)
    del W, Z, r

    cols = members[0].columns
    gs = spec.effective_group_size(cols)
    results: list[GPTQResult | None] = [None] * len(weights)
    for b, (solver, (perm, _dead, _Z, _r, damp, damp_frac)) in enumerate(zip(members, factors)):
        g_idx = torch.arange(cols, dtype=torch.int32, device=device) // gs
        solver_codes = codes[b]
        if perm is not None:
            # Column perm[p] was processed at position p and belongs to group p // gs.
            solver_codes = torch.empty_like(codes[b])
            solver_codes[:, perm] = codes[b]
            g_idx_orig = torch.empty_like(g_idx)
            g_idx_orig[perm] = g_idx
            g_idx = g_idx_orig
        r0 = 0
        for i in rows_of[id(solver)]:
            r1 = r0 + weights[i].shape[0]
            loss = float(losses[b, r0:r1].sum())
            qweight = QuantizedWeight(
                codes=solver_codes[r0:r1].to(torch.uint8),
                scales=scales[b, r0:r1].clone(),
                zeros=zeros[b, r0:r1].to(torch.uint8),
                g_idx=g_idx.clone(),  # every matrix owns its tensors (they are saved separately)
                bits=spec.bits,
                group_size=spec.group_size,
                sym=spec.sym,
            )
            logger.debug("GPTQ: %dx%d bits=%d group=%d act_order=%s loss=%.4g damp_percent=%.3g",
                         r1 - r0, cols, spec.bits, spec.group_size, spec.act_order, loss, damp_frac)
            results[i] = GPTQResult(qweight=qweight, loss=loss, damp=damp, damp_percent=damp_frac, perm=perm,
                                    nsamples=solver._nsamples)
            r0 = r1
    return results


def _solve_columns(W: torch.Tensor, Z: torch.Tensor, r: torch.Tensor, spec: QuantSpec,
                   exact_group_grids: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ column loop over a batch: ``W`` ``[B, rows, cols]`` fp32 (overwritten), ``Z`` ``[B, cols, cols]``
    and ``r`` ``[B, cols]`` the feedback matrices and column scales of the damped Hessians (:class:`Factorisation`).
    Returns fp32 codes ``[B, rows, cols]``, scales and zero points ``[B, rows, groups]`` and per-element losses
    ``[B, rows, cols]`` (processing order).

    The updates are GPTQ's. Its loop quantizes column j of the updated weights ``W'`` and pushes the scaled error
    ``(w'_j - q_j) / U_jj`` along row j of ``U`` (``H^-1 = U^T U``). Unrolled, that is
    ``w'_j = w_j + sum_{k<j} (w_k - q_k) Z_kj`` with the *original* weights ``w_k`` and ``Z = U^-1 diag(U)``, a
    column-scaled Cholesky factor of ``H`` itself. So each block of columns starts from its original weights plus
    one matmul of the earlier columns' residuals ``w_k - q_k`` (kept in ``W``'s processed columns, whose weights
    are no longer needed), and inside the block each residual goes along its row of ``Z``: GPTQ's lazy blocks and
    arithmetic, with no inverse and no second copy of the weights.
    """
    batch, rows, cols = W.shape
    gs = spec.effective_group_size(cols)
    bits = spec.bits
    maxq = (1 << bits) - 1
    codes = torch.zeros(batch, rows, cols, dtype=torch.float32, device=W.device)
    scales = torch.zeros(batch, rows, cols // gs, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(batch, rows, cols // gs, dtype=torch.float32, device=W.device)
    losses = torch.zeros(batch, rows, cols, dtype=torch.float32, device=W.device)
    scale = zero = None

    def updated(c0: int, c1: int, residuals: torch.Tensor | None, k1: int) -> torch.Tensor:
        """``W'`` of columns [c0, c1) after the feedback of columns [0, k1) (``residuals`` ``[B, rows, k1 - i1]``
        of the current block beyond W's processed columns)."""
        out = W[:, :, c0:c1]
        if i1 > 0:
            out = out + W[:, :, :i1] @ Z[:, :i1, c0:c1]
        if residuals is not None and k1 > i1:
            out = out + residuals @ Z[:, i1:k1, c0:c1]
        return out

    # The column loop is Python-bound on small and mid-size matrices (one column of a few hundred rows per
    # step), so each step issues as few torch calls as possible: the block is held transposed (a column is a
    # contiguous row), the arithmetic is in place, codes and residuals are gathered per block, and every batch
    # member takes the same step. Codes are computed by the same fp32 operations as quantize_to_codes.
    bs = spec.block_size
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        count = i2 - i1
        W1 = updated(i1, i2, None, i1)                       # [B, rows, count]: the block as of its start
        W1T = W1.transpose(1, 2).contiguous()               # the block as its columns are quantized
        W0T = W[:, :, i1:i2].transpose(1, 2).contiguous()   # its original weights
        Z1 = Z[:, i1:i2, i1:i2]
        block_codes: list[torch.Tensor] = []
        resids: list[torch.Tensor] = []                      # w_k - q_k of this block's columns
        for i in range(count):
            j = i1 + i
            if j % gs == 0:
                g_end = j + gs
                # The grid is fitted on GPTQ's updated weights of the group's columns: as of this block's start
                # (reference) or of column j (exact). Those are the weights after the feedback of the fixed
                # columns < lo, ``w + delta Z_[lo:, lo:]^-1`` with ``delta`` what the loop's sums with Z add to
                # them by then; only the group's own diagonal block of Z is needed (it is triangular).
                lo = j if exact_group_grids else i1
                if exact_group_grids:
                    partial = W1T[:, i : min(i + gs, count)].transpose(1, 2)
                    pending = torch.stack(resids, dim=2) if resids else None
                else:
                    partial, pending = W1[:, :, : min(g_end, i2) - i1], None
                if g_end > i2:
                    partial = torch.cat([partial, updated(i2, g_end, pending, lo)], dim=2)
                original = W[:, :, lo:g_end]       # W's columns from i1 on still hold the original weights
                part = original + torch.linalg.solve_triangular(
                    Z[:, lo:g_end, lo:g_end], partial - original, upper=True, left=False, unitriangular=True)
                part = part[:, :, j - lo:]
                scale, zero = spec.fit(part, r[:, j:g_end].unsqueeze(1).square())
                scales[:, :, j // gs] = scale
                zeros[:, :, j // gs] = zero
            w = W1T[:, i]                          # [B, rows]
            code = w / scale                       # clamp(round(w / scale) + zero, 0, maxq)
            code.round_().add_(zero).clamp_(0, maxq)
            resid = code - zero                    # q = (code - zero) * scale; resid = w - q (original w)
            resid.mul_(scale)
            torch.sub(W0T[:, i], resid, out=resid)
            block_codes.append(code)
            resids.append(resid)
            if i + 1 < count:
                W1T[:, i + 1 :].add_(Z1[:, i, i + 1 :].unsqueeze(2) * resid.unsqueeze(1))
        R1T = torch.stack(resids, dim=1)                     # [B, count, rows]
        codes[:, :, i1:i2] = torch.stack(block_codes, dim=2)
        # GPTQ's loss of column j: ((w'_j - q_j) / U_jj)^2 / 2 with 1 / U_jj = r_j, and w' - q = w' - w + resid.
        err = W1T.sub_(W0T).add_(R1T).mul_(r[:, i1:i2].unsqueeze(2))
        losses[:, :, i1:i2] = err.square_().div_(2).transpose(1, 2)
        W[:, :, i1:i2] = R1T.transpose(1, 2)                 # from here on W's column holds the residual
    return codes, scales, zeros, losses
