"""GPTQ fitted to the full-precision layer output: asymmetric calibration (GPTAQ, Li et al., ICML 2025,
"GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration", arXiv 2504.02692).

GPTQ quantizes a Linear ``W`` on the inputs ``X_q`` that the *quantized* model feeds it and minimises
``||(W - Q) X_q||^2``: the quantized layer reproduces what the FP weights compute on the already degraded inputs,
so the errors of earlier layers are taken as given. GPTAQ fits the FP model's own output instead,

    min_Q ||W X_fp - Q X_q||^2,

with ``X_fp`` what the FP model feeds the same Linear on the same tokens: the quantized layer is asked to undo part
of the error that reached it.

What is implemented here: an exact reduction to GPTQ. With ``H = X_q X_q^T`` and ``C = X_fp X_q^T``
(``[columns, columns]``, ``C[i, j] = sum_t x_fp[t, i] x_q[t, j]``; both carry GPTQ's ``2/n`` scale),

    ||W X_fp - Q X_q||^2 = tr(Q H Q^T) - 2 tr(W C Q^T) + const = ||(W* - Q) X_q||^2 + const,   W* = W C H^-1,

so the unchanged GPTQ column loop run on the target ``W*`` with the usual ``H`` minimises the asymmetric objective.
Damping: GPTQ with ``H + lambda I`` (lambda = damp_percent x the mean diagonal) minimises
``||(W - Q) X_q||^2 + lambda ||W - Q||^2``; the same regulariser is kept here,

    ||W X_fp - Q X_q||^2 + lambda ||W - Q||^2 = tr((W* - Q)(H + lambda I)(W* - Q)^T) + const,
    W* = W (C + lambda I)(H + lambda I)^-1,

so ``X_fp == X_q`` gives ``C = H`` and ``W* = W``: the option is then plain GPTQ. (Damping ``H`` alone,
``W C (H + lambda I)^-1``, would add ``lambda ||Q||^2`` instead, pulling every weight toward zero, and move the
target even when both streams agree.) ``lambda`` is the solver's own: when GPTQ has to escalate its damping to
factorise ``H``, the target is recomputed with the damping it used (:meth:`AsymmetricGPTQ.quantize`).

``alpha`` blends the two targets: the fitted inputs are ``X_q + alpha (X_fp - X_q)``, i.e. ``C_alpha = H + alpha (C
- H)``; 1 fits the FP output, 0 is GPTQ. GPTAQ's public code (fake_quant/gptaq_utils.py) scales its correction term,
which is linear in ``X_fp - X_q``, by ``alpha = 0.25`` by default; ``C_alpha`` is the same blend of the objective.

GPTAQ's own formulation, and why not that one: it keeps ``W`` as the target and adds a column-wise correction to
the GPTQ loop, ``P = alpha * triu_1((X_fp - X_q) X_q^T U^T) U`` (``U``: the upper Cholesky factor of ``H^-1``); when
column ``i`` is quantized, the residual ``w_i (x_fp,i - x_q,i)`` of that column is absorbed by the columns not
quantized yet (row ``i`` of P, a second rank-1 update per column, with ``w_i`` the column's current, already
corrected value). Differences: (1) it changes the column loop itself (a dense ``P``, an extra update per column and
per lazy block), where the reduction above leaves the solver untouched (one ``[rows, columns] x [columns, columns]``
product and one Cholesky solve per matrix, and a second ``[columns, columns]`` accumulator next to ``H``); (2) it
does not reach the minimiser of its objective even without rounding: its first column is never changed and the
residual of its last column is never compensated, and the corrections compound through the corrected ``w_i`` (with
``alpha = 1`` it can end above the uncorrected ``W`` when the streams differ much, which its default
``alpha = 0.25`` tempers). GPTQ on ``W*`` returns exactly the least-squares optimum ``W*`` without rounding, and at
every step of the column loop the not-yet-quantized columns sit at the optimum of the asymmetric objective given
the quantized ones (GPTQ's OBS invariant applied to the identity above).
``tests/test_gptq_target.py::test_the_reduction_beats_gptaqs_column_wise_correction_on_its_own_objective`` runs
both (GPTAQ's rule written from its update formula) on random problems.
"""
from __future__ import annotations

import math

import torch

from .gptq import GPTQ, GPTQResult
from .grid import QuantSpec

__all__ = ["AsymmetricGPTQ", "fp_target"]


def fp_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp_percent: float,
              alpha: float = 1.0) -> torch.Tensor:
    """The GPTQ target ``W* = W (C_a + lambda I)(H + lambda I)^-1`` of the asymmetric objective (module docstring).

    Args:
        weight: ``W`` ``[rows, columns]``.
        hessian: ``H`` (``2/n sum_t x_q x_q^T``), ``[columns, columns]``.
        cross: ``C`` (``2/n sum_t x_fp x_q^T``, the FP input on the left), same shape and scale as ``hessian``.
        damp_percent: the solver's damping, as a fraction of the mean diagonal of ``H``.
        alpha: the share of the FP input in the fitted input (1: the FP output; 0: plain GPTQ, ``W* = W``).

    Columns that never saw a quantized-stream input (zero diagonal of ``H``) get the solver's unit pivot on both
    matrices, so their target is ``W``'s own column (the solver then pins them to zero). Computed in the dtype of
    ``hessian`` (fp32 in the solver; a failed fp32 factorisation is retried in fp64).
    """
    if hessian.shape != cross.shape or weight.shape[1] != hessian.shape[0]:
        raise ValueError(f"shapes do not match: weight {tuple(weight.shape)}, H {tuple(hessian.shape)}, "
                         f"C {tuple(cross.shape)}")
    H = hessian.clone()
    C = hessian + alpha * (cross - hessian) if alpha != 1.0 else cross.clone()
    dead = torch.diagonal(H) == 0
    if bool(dead.any()):  # as GPTQ._factorisation: a unit pivot, so the damping below is the solver's
        H[dead, dead] = 1.0
        C[dead, dead] = 1.0
    damp = float(damp_percent) * torch.diagonal(H).mean()
    H.diagonal().add_(damp)
    C.diagonal().add_(damp)
    W = weight.to(H.dtype)
    M = W @ C                                   # W (C + lambda I)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:                          # fp32 can fail where fp64 does not
        L = torch.linalg.cholesky(H.double())
        return torch.cholesky_solve(M.T.double(), L).T.to(H.dtype)
    return torch.cholesky_solve(M.T, L).T       # (H + lambda I) is symmetric: W* = M (H + lambda I)^-1


class AsymmetricGPTQ:
    """A GPTQ solver fitted to the FP layer output: fed the quantized-stream input ``x`` and the FP-stream input
    ``x_fp`` of the same tokens (same rows, same order), it quantizes ``W`` for ``min ||W X_fp - Q X_q||^2`` by
    running :class:`GPTQ` on the target :func:`fp_target` (module docstring).

    ``H``, ``nsamples`` and ``quantize(weight, spec)`` are those of a GPTQ solver, so the pipeline uses either.
    """

    def __init__(self, columns: int, device: torch.device | str | None = None, alpha: float = 1.0) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.gptq = GPTQ(columns, device=device)
        self.alpha = float(alpha)
        self._C = torch.zeros_like(self.gptq.H)

    @property
    def columns(self) -> int:
        return self.gptq.columns

    @property
    def nsamples(self) -> int:
        return self.gptq.nsamples

    @property
    def H(self) -> torch.Tensor:
        """``2/n sum x_q x_q^T`` (the GPTQ Hessian of the quantized-stream inputs)."""
        return self.gptq.H

    @property
    def C(self) -> torch.Tensor:
        """``2/n sum x_fp x_q^T`` (fp32 ``[columns, columns]``; row index = FP input feature; do not modify)."""
        return self._C

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor, x_fp: torch.Tensor) -> None:
        """Accumulate the quantized-stream inputs ``x`` and the FP-stream inputs ``x_fp`` of the same tokens
        (``[..., columns]`` each, row t of one is row t of the other), a bounded chunk of rows at a time like
        :meth:`GPTQ.add_batch`."""
        if x_fp.shape != x.shape:
            raise ValueError(f"FP inputs {tuple(x_fp.shape)} do not match the quantized inputs {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.columns)
        x_fp = x_fp.detach().reshape(-1, self.columns)
        m = x.shape[0]
        if m == 0:
            return
        before = self.gptq.nsamples
        self.gptq.add_batch(x)
        total = before + m
        self._C.mul_(before / total)  # the running mean of H, kept on the same scale
        scale = math.sqrt(2.0 / total)
        step = self.gptq.chunk_rows()
        device = self._C.device
        for start in range(0, m, step):
            q = x[start:start + step].to(device, torch.float32) * scale
            fp = x_fp[start:start + step].to(device, torch.float32) * scale
            self._C.addmm_(fp.T, q)
            del q, fp

    def target(self, weight: torch.Tensor, damp_percent: float) -> torch.Tensor:
        """:func:`fp_target` of ``weight`` with this solver's ``H`` and ``C`` (fp32, on the solver's device)."""
        return fp_target(weight.detach().to(self._C.device, torch.float32), self.H, self._C, damp_percent,
                         self.alpha)

    @torch.no_grad()
    def loop_input(self, weight: torch.Tensor, spec: QuantSpec) -> tuple[GPTQ, torch.Tensor]:
        """(the inner GPTQ solver, the target ``W*``) for a shared column loop (`quant.gptq.quantize_together`):
        the factorisation is made first, so the target takes the damping the solver ends up using (escalated if
        needed), as :meth:`quantize` does with its second pass."""
        damp_percent = self.gptq._factorisation(bool(spec.act_order), float(spec.damp_percent)).damp_percent
        return self.gptq, self.target(weight, damp_percent)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, spec: QuantSpec, **kwargs) -> GPTQResult:
        """GPTQ of the target ``W*`` under ``spec`` (keyword arguments go to :meth:`GPTQ.quantize`). The loss is
        GPTQ's against ``W*``: the asymmetric objective up to a constant. The target takes the damping the solver
        ends up using (:meth:`loop_input`), so a Hessian that needs more damping than asked is handled."""
        if self.nsamples == 0:
            raise ValueError("GPTQ: no calibration samples were added (nsamples == 0)")
        solver, target = self.loop_input(weight, spec)
        return solver.quantize(target, spec, **kwargs)
