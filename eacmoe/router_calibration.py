"""QESC router calibration: refit a router so the quantized model keeps choosing the FP model's experts.

EAC-MoE (Chen et al., 2025), eq. "TopK-MSE": with W the full-precision router, x its input in the FP model and
x' its input in the (partially) quantized model, train W' (initialised from W) to minimise

    L = mean over tokens of  1/K * sum_{i in topK(W x)} ((W x)_i - (W' x')_i)^2

K wider than the model's top-k matches the experts that matter plus the near misses that shift most easily;
K = number of experts is plain MSE (the paper's ablation, `qesc-mse`), K = top-k overfits.

The paper gives no optimiser settings. We use full-batch Adam (lr 1e-3) on the router weight only, up to 1000
steps, and keep the step with the lowest loss on a held-out tenth of the calibration tokens, stopping after 100
steps without improvement, so extra steps cannot overfit. docs/ROUTER_SWEEP.md has the measurement behind
these defaults (scripts/router_sweep.py). `solver="ridge"` instead computes the minimiser exactly, damped toward
W (each row solves (H_i + d_i I) w_i = b_i + d_i w_i^FP with the statistics below), the damping chosen on the
held-out tokens; the sweep compares the two.

L is quadratic in W' and separates by router row: row i only meets the tokens whose target top-K holds expert
i. So besides evaluating it on the token rows (memory tokens x hidden, cost per step tokens x hidden x experts),
it can be evaluated exactly from per-expert statistics H_i = sum x' x'^T, b_i = sum a x', c_i = sum a^2
(memory experts x hidden^2, cost per step independent of the number of tokens). Both give the same loss and
gradient, hence the same Adam trajectory; on small routers the statistics are several times faster (1000 Adam
steps on a tiny-mixtral router: 0.78 s instead of 2.15 s, docs/ROUTER_SWEEP.md). "auto" takes them when they fit in
STATISTICS_BUDGET_BYTES or in the memory of the token rows they replace (Mixtral-8x7B: tokens).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

log = logging.getLogger(__name__)
STATISTICS_BUDGET_BYTES = 256 * 2**20
RIDGE_LIMIT_BYTES = 16 * 2**30


@dataclass(frozen=True)
class RouterCalibrationConfig:
    topk: int                 # K of the TopK-MSE loss (number of experts = plain MSE)
    steps: int = 1000
    lr: float = 1e-3
    patience: int = 100       # stop after this many steps without a held-out improvement
    max_tokens: int = 32768   # a seeded subset beyond this: the router has only E x H weights to fit
    holdout_fraction: float = 0.1
    seed: int = 0
    objective: Literal["auto", "tokens", "statistics"] = "auto"   # how L is evaluated (same values, see above)
    solver: Literal["adam", "ridge"] = "adam"   # ridge: the exact minimiser of L + damping toward W (statistics)
    ridge_dampings: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)   # x mean diagonal of H_i, chosen on held-out


@dataclass
class RouterCalibrationResult:
    weight: torch.Tensor      # calibrated router weight [E, H], same dtype as the input weight
    loss_before: float        # held-out TopK-MSE of the FP router on the quantized stream
    loss_after: float         # held-out TopK-MSE of the calibrated router
    best_step: int


def topk_mse(target_logits: torch.Tensor, logits: torch.Tensor, topk_index: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the mean squared logit error over each token's K target experts (the definition)."""
    return (target_logits.gather(-1, topk_index) - logits.gather(-1, topk_index)).pow(2).mean()


class TokenObjective:
    """TopK-MSE of W' and its gradient, computed on the token rows: residuals outside a token's K targets are 0."""

    def __init__(self, router_input: torch.Tensor, target_logits: torch.Tensor, topk_index: torch.Tensor):
        self.x = router_input
        self.mask = torch.zeros_like(target_logits).scatter_(-1, topk_index, 1.0)
        self.target = target_logits * self.mask
        self.scale = 1.0 / topk_index.numel()

    def _residual(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.x @ weight.T) * self.mask - self.target

    def loss_and_grad(self, weight: torch.Tensor) -> tuple[float, torch.Tensor]:
        residual = self._residual(weight)
        return self.scale * residual.pow(2).sum().item(), (2 * self.scale) * (residual.T @ self.x)

    def loss(self, weight: torch.Tensor) -> float:
        return self.scale * self._residual(weight).pow(2).sum().item()


class StatisticsObjective:
    """The same loss and gradient from per-expert sufficient statistics, in float64 (the loss is a small
    difference of large terms):  sum over tokens t routed to i of (a_ti - w_i x_t)^2 = w_i H_i w_i - 2 w_i b_i + c_i."""

    def __init__(self, router_input: torch.Tensor, target_logits: torch.Tensor, topk_index: torch.Tensor):
        num_experts, hidden = target_logits.shape[-1], router_input.shape[-1]
        mask = torch.zeros_like(target_logits, dtype=torch.bool).scatter_(-1, topk_index, True)
        x = router_input.double()
        self.hessian = x.new_zeros(num_experts, hidden, hidden)
        self.cross = x.new_zeros(num_experts, hidden)
        self.target_energy = x.new_zeros(())
        for expert in range(num_experts):
            rows = mask[:, expert]
            x_i, a_i = x[rows], target_logits[rows, expert].double()
            self.hessian[expert] = x_i.T @ x_i
            self.cross[expert] = a_i @ x_i
            self.target_energy += a_i.pow(2).sum()
        self.scale = 1.0 / topk_index.numel()

    def _value(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.double()
        hw = torch.bmm(self.hessian, w.unsqueeze(-1)).squeeze(-1)
        return self.scale * ((w * hw).sum() - 2 * (w * self.cross).sum() + self.target_energy), hw

    def loss_and_grad(self, weight: torch.Tensor) -> tuple[float, torch.Tensor]:
        value, hw = self._value(weight)
        return value.item(), ((2 * self.scale) * (hw - self.cross)).to(weight.dtype)

    def loss(self, weight: torch.Tensor) -> float:
        return self._value(weight)[0].item()

    def ridge_solution(self, weight_fp: torch.Tensor, damping: float) -> torch.Tensor:
        """argmin_W  L(W) + sum_i d_i ||w_i - w_fp_i||^2  with d_i = damping x mean diagonal of H_i: each row solves
        (H_i + d_i I) w_i = b_i + d_i w_fp_i. An expert no token targets keeps its FP row."""
        hidden = self.hessian.shape[-1]
        diag_mean = self.hessian.diagonal(dim1=-2, dim2=-1).mean(-1)
        d = damping * diag_mean + 1e-12
        eye = torch.eye(hidden, dtype=self.hessian.dtype, device=self.hessian.device)
        rhs = self.cross + d[:, None] * weight_fp.double()
        # symmetric positive definite: Cholesky (batched LU through MKL fails on more than one CPU thread here)
        factor = torch.linalg.cholesky(self.hessian + d[:, None, None] * eye)
        return torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1).to(weight_fp.dtype)


def make_objective(kind: str, router_input: torch.Tensor, target_logits: torch.Tensor,
                   topk_index: torch.Tensor) -> TokenObjective | StatisticsObjective:
    if kind == "statistics":
        return StatisticsObjective(router_input, target_logits, topk_index)
    if kind == "tokens":
        return TokenObjective(router_input, target_logits, topk_index)
    raise ValueError(f"unknown router calibration objective {kind!r} (auto, tokens, statistics)")


def calibrate_router(router_weight_fp: torch.Tensor, router_input_fp: torch.Tensor, router_input_q: torch.Tensor,
                     config: RouterCalibrationConfig,
                     selection_scores: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RouterCalibrationResult:
    """Fit W' minimising TopK-MSE between W x (FP stream) and W' x' (quantized stream); tokens are rows.

    `selection_scores` maps logits to the scores the family ranks experts by (DeepSeek-V3: sigmoid plus a
    correction bias), so the K target experts are the ones the model would really rank highest."""
    if router_input_fp.shape != router_input_q.shape:
        raise ValueError("FP and quantized router inputs must have the same shape")
    num_experts = router_weight_fp.shape[0]
    if not 1 <= config.topk <= num_experts:
        raise ValueError(f"router calibration K={config.topk} must be between 1 and the number of experts ({num_experts})")
    device = router_weight_fp.device
    w_fp = router_weight_fp.detach().float()
    # The seeded subset first, before any cast or copy: only max_tokens rows are ever converted to fp32 or moved to
    # the router's device (Mixtral-8x7B at 128 x 2048 tokens: 2 x 4 GiB of fp32 the old order cast first).
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(router_input_q.shape[0], generator=generator)[: config.max_tokens]
    x_fp = router_input_fp[order.to(router_input_fp.device)].to(device=device, dtype=torch.float32)
    x_q = router_input_q[order.to(router_input_q.device)].to(device=device, dtype=torch.float32)
    with torch.no_grad():
        target = x_fp @ w_fp.T
        ranking = target if selection_scores is None else selection_scores(target)
        target_index = ranking.topk(config.topk, dim=-1).indices

    n_tokens = order.numel()
    n_holdout = int(n_tokens * config.holdout_fraction) if n_tokens >= 10 else 0
    hold, train = slice(0, n_holdout), slice(n_holdout, n_tokens)  # the rows are already in the seeded order
    if n_holdout == 0:  # too few tokens to hold any out: select on the training loss
        hold = train
    hidden = x_q.shape[-1]
    statistics_bytes = 2 * num_experts * hidden * hidden * 8  # float64, for the fit and the held-out split
    kind = config.objective
    if config.solver == "ridge":
        kind = "statistics"  # the exact solution needs H_i and b_i
        if statistics_bytes > RIDGE_LIMIT_BYTES:
            raise ValueError(f"the ridge router solver needs {statistics_bytes / 2**30:.1f} GiB of statistics for "
                             f"{num_experts} experts x hidden {hidden}; use the adam solver for this model")
    elif config.solver != "adam":
        raise ValueError(f"unknown router calibration solver {config.solver!r} (adam, ridge)")
    if kind == "auto":
        kind = "statistics" if statistics_bytes <= max(STATISTICS_BUDGET_BYTES, n_tokens * hidden * 4) else "tokens"
    with torch.no_grad():
        train_objective = make_objective(kind, x_q[train], target[train], target_index[train])
        hold_objective = make_objective(kind, x_q[hold], target[hold], target_index[hold])
    del x_fp, x_q

    loss_before = best_loss = hold_objective.loss(w_fp)
    best_weight, best_step = w_fp.clone(), 0
    if config.solver == "ridge":
        for damping in config.ridge_dampings:
            candidate = train_objective.ridge_solution(w_fp, damping)
            current = hold_objective.loss(candidate)
            log.debug("router ridge damping %g: held-out TopK-MSE %.4g", damping, current)
            if current < best_loss:
                best_loss, best_weight = current, candidate
        return RouterCalibrationResult(best_weight.to(router_weight_fp.dtype), loss_before, best_loss, best_step)

    weight = w_fp.clone()
    optimizer = torch.optim.Adam([weight], lr=config.lr)
    with torch.no_grad():  # the gradient is closed-form (both objectives), no autograd graph needed
        for step in range(1, config.steps + 1):
            _, weight.grad = train_objective.loss_and_grad(weight)
            optimizer.step()
            current = hold_objective.loss(weight)
            if current < best_loss:
                best_loss, best_weight, best_step = current, weight.clone(), step
            elif step - best_step >= config.patience:
                break
    log.debug("router calibration: held-out TopK-MSE %.4g -> %.4g (best step %d)", loss_before, best_loss, best_step)
    return RouterCalibrationResult(best_weight.to(router_weight_fp.dtype), loss_before, best_loss, best_step)
