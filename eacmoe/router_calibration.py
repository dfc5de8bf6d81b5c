"""QESC router calibration: refit a router so the quantized model keeps choosing the FP model's experts.

EAC-MoE (Chen et al., 2025), eq. "TopK-MSE": with W the full-precision router, x its input in the FP model and
x' its input in the (partially) quantized model, train W' (initialised from W) to minimise

    L = mean over tokens of  1/K * sum_{i in topK(W x)} ((W x)_i - (W' x')_i)^2

K wider than the model's top-k matches the experts that matter plus the near misses that shift most easily;
K = number of experts is plain MSE (the paper's ablation, `qesc-mse`), K = top-k overfits.

The paper gives no optimiser settings. We use full-batch Adam (lr 1e-3) on the router weight only, up to 1000
steps, and keep the step with the lowest loss on a held-out tenth of the calibration tokens, stopping after 100
steps without improvement, so extra steps cannot overfit. docs/ROUTER_SWEEP.md has the measurement behind
these defaults (scripts/router_sweep.py).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterCalibrationConfig:
    topk: int                 # K of the TopK-MSE loss (number of experts = plain MSE)
    steps: int = 1000
    lr: float = 1e-3
    patience: int = 100       # stop after this many steps without a held-out improvement
    max_tokens: int = 32768   # a seeded subset beyond this: the router has only E x H weights to fit
    holdout_fraction: float = 0.1
    seed: int = 0


@dataclass
class RouterCalibrationResult:
    weight: torch.Tensor      # calibrated router weight [E, H], same dtype as the input weight
    loss_before: float        # held-out TopK-MSE of the FP router on the quantized stream
    loss_after: float         # held-out TopK-MSE of the calibrated router
    best_step: int


def topk_mse(target_logits: torch.Tensor, logits: torch.Tensor, topk_index: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the mean squared logit error over each token's K target experts."""
    return (target_logits.gather(-1, topk_index) - logits.gather(-1, topk_index)).pow(2).mean()


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
    x_fp = router_input_fp.to(device=device, dtype=torch.float32)
    x_q = router_input_q.to(device=device, dtype=torch.float32)
    with torch.no_grad():
        target = x_fp @ w_fp.T
        ranking = target if selection_scores is None else selection_scores(target)
        target_index = ranking.topk(config.topk, dim=-1).indices

    n_tokens = x_q.shape[0]
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n_tokens, generator=generator).to(device)[: config.max_tokens]
    n_tokens = order.numel()
    n_holdout = int(n_tokens * config.holdout_fraction) if n_tokens >= 10 else 0
    hold, train = order[:n_holdout], order[n_holdout:]
    if n_holdout == 0:  # too few tokens to hold any out: select on the training loss
        hold = train
    # gather each split once; every step then works on contiguous tensors
    x_train, target_train, index_train = x_q[train], target[train], target_index[train]
    x_hold, target_hold, index_hold = x_q[hold], target[hold], target_index[hold]

    def heldout_loss(w: torch.Tensor) -> float:
        with torch.no_grad():
            return topk_mse(target_hold, x_hold @ w.T, index_hold).item()

    weight = w_fp.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=config.lr)
    loss_before = best_loss = heldout_loss(w_fp)
    best_weight, best_step = w_fp.clone(), 0
    for step in range(1, config.steps + 1):
        loss = topk_mse(target_train, x_train @ weight.T, index_train)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        current = heldout_loss(weight.detach())
        if current < best_loss:
            best_loss, best_weight, best_step = current, weight.detach().clone(), step
        elif step - best_step >= config.patience:
            break
    log.debug("router calibration: held-out TopK-MSE %.4g -> %.4g (best step %d)", loss_before, best_loss, best_step)
    return RouterCalibrationResult(best_weight.to(router_weight_fp.dtype), loss_before, best_loss, best_step)
