"""Which output the routed experts' GPTQ fits (`--gptq-target`): the quantized stream's or the FP model's.

- ``quantized`` (the default, GPTQ and GPTQModel): each expert Linear minimises ``||(W - Q) X_q||^2`` on the inputs
  the quantized model gives it.
- ``fp`` (asymmetric calibration in the GPTAQ manner, ICML 2025): ``||W X_fp - Q X_q||^2``, the FP model's output
  on the FP model's inputs for the same tokens, solved exactly as GPTQ on a moved target
  (`eacmoe.quant.asymmetric`, which also compares it with GPTAQ's own column-wise correction).
- ``fp:A`` (0 < A <= 1): the fitted inputs are ``X_q + A (X_fp - X_q)``; GPTAQ's public code uses A = 0.25.

For an expert, ``X_q`` are the rows of the MoE block's input on the quantized stream for the tokens its
(calibrated) router sends to it, and ``X_fp`` the rows of the FP stream's block input for the *same* tokens (the
pipeline already captures it for router calibration): the gate and up projections fit ``W x_fp``; the down
projection fits the FP expert's ``W_down (act(G x_fp) * (U x_fp))`` from the quantized expert's
``act(G' x_q) * (U' x_q)``. Routing weights of ``--expert-hessian weighted`` multiply both rows alike.

Scope: routed experts only. Attention, shared experts and dense MLP layers keep the quantized-stream target. The FP
stream exists only under ``--method qesc`` / ``qesc-mse`` (router calibration needs it); ``--method gptq`` with
``--gptq-target fp`` is refused rather than keeping a second stream and an FP copy of each layer for it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .quant.asymmetric import AsymmetricGPTQ

__all__ = ["FP_STREAM_METHODS", "FPExpertInputs", "GPTQ_TARGETS", "check_gptq_target", "fp_expert_inputs",
           "gptq_target_alpha"]

GPTQ_TARGETS = ("quantized", "fp")     # and fp:A
FP_STREAM_METHODS = ("qesc", "qesc-mse")  # the methods that carry the FP stream through the layers


def gptq_target_alpha(target: str) -> float:
    """The share A of the FP input in the fitted input: 0 for ``quantized``, 1 for ``fp``, A for ``fp:A``;
    ValueError (one line, naming the choices) otherwise."""
    if target == "quantized":
        return 0.0
    if target == "fp":
        return 1.0
    if isinstance(target, str) and target.startswith("fp:"):
        try:
            alpha = float(target[3:])
        except ValueError:
            alpha = float("nan")
        if 0.0 < alpha <= 1.0:
            return alpha
    raise ValueError(f"--gptq-target must be quantized, fp or fp:A with 0 < A <= 1 (got {target!r})")


def check_gptq_target(target: str, method: str) -> None:
    """ValueError when `target` is malformed or needs the FP stream that `method` does not keep."""
    if gptq_target_alpha(target) > 0 and method not in FP_STREAM_METHODS:
        raise ValueError(f"--gptq-target {target} fits the FP model's expert outputs, which needs the FP stream that "
                         f"only --method {' / '.join(FP_STREAM_METHODS)} keep (got --method {method})")


class FPExpertInputs:
    """What the FP model feeds one MoE block's routed experts: its block input ``[tokens, hidden]``, row t for the
    same token as row t of the quantized stream's block input, and the solvers that fit the FP output."""

    def __init__(self, block_input: Tensor, act: Callable[[Tensor], Tensor], alpha: float = 1.0):
        self.block_input = block_input
        self.act = act
        self.alpha = alpha

    def solver(self, columns: int, device: torch.device | str | None = None) -> AsymmetricGPTQ:
        return AsymmetricGPTQ(columns, device=device, alpha=self.alpha)

    def rows(self, token_index: Tensor | None, start: int, stop: int) -> Tensor:
        """The FP rows of the quantized chunk that holds rows ``start:stop`` of an expert's token list
        (``token_index``; None: every token of the layer, the pooled fallback)."""
        if token_index is None:
            return self.block_input[start:stop]
        return self.block_input[token_index[start:stop]]

    def down_input(self, x_fp: Tensor, gate: Tensor, up: Tensor) -> Tensor:
        """The FP expert's down-projection input ``act(x G^T) * (x U^T)`` with its FP gate and up weights."""
        return self.act(x_fp.to(gate.dtype) @ gate.T) * (x_fp.to(up.dtype) @ up.T)


def fp_expert_inputs(target: str, block_input: Tensor | None,
                     act: Callable[[Tensor], Tensor]) -> FPExpertInputs | None:
    """The FP inputs of a block's experts under `target` (None for ``quantized``: plain GPTQ)."""
    alpha = gptq_target_alpha(target)
    if alpha == 0.0:
        return None
    if block_input is None:
        raise ValueError(f"--gptq-target {target} needs the FP stream's block input")
    return FPExpertInputs(block_input, act, alpha)
