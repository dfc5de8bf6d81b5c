"""Which weight each calibration token gets in an expert's GPTQ Hessian (`--expert-hessian`).

GPTQ minimises ``tr((W - Q) H (W - Q)^T)`` with ``H = 2/n * sum_t x_t x_t^T`` over the rows the matrix sees. An
MoE block does not add an expert's output as is: it multiplies it by the token's combine weight ``g_{t,e}`` (the
router's probability, renormalised over the top-k where the family renormalises) and the shared expert, where the
family gates it, by its gate (Qwen2-MoE: ``sigmoid(shared_expert_gate(x))``). An error of the expert on token t is
scaled by the same factor, so the block-output loss of quantizing expert e is ``sum_t g_{t,e} |dW x_t|^2``, not the
unweighted sum (MoEQuant, ICML 2025, "affinity-guided" Hessians).

Variants (one object each; `EXPERT_HESSIANS` is the one place to add another):

- ``routed`` (the default, what GPTQModel does): ``H_e = 2/n * sum_{t routed to e} x_t x_t^T``.
- ``weighted``: ``H_e = 2/n * sum_{t routed to e} g_{t,e} x_t x_t^T`` with ``n`` = the number of tokens routed to
  e (the normaliser of the routed variant, so the two differ only by the weights; GPTQ's solution does not depend
  on the scale of H, but its damping is relative to the mean diagonal, which the weights change consistently for
  every matrix). It is fed to the solver as rows ``sqrt(g_{t,e}) x_t``. The same weight applies to the down
  projection's input ``act(gate x) * up x`` (its output is scaled by g too), and the shared expert's Linears get
  ``sqrt(gate_t)``. ``g`` comes from the routing that picked the tokens: the quantized model's own (calibrated)
  router on the quantized stream, as `adapter.route` computes the combine weights. An expert with too few routed
  tokens of its own follows `--sparse-expert-policy` (sparse_experts.py) instead: on the layer's pooled tokens
  they have no combine weight for it, so ``pool`` leaves them unweighted and ``weighted-pool`` weights them by the
  router's probability of the expert, through the same `weighted_rows`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .adapters import MoEAdapter, Routing

__all__ = ["EXPERT_HESSIANS", "ExpertHessian", "RoutedHessian", "WeightedHessian", "get_expert_hessian"]


class ExpertHessian:
    """How tokens are weighted in the Hessians of the experts (routed and shared). The base class is ``routed``."""

    name: str = ""

    def routed_weights(self, routing: Routing, expert: int, token_index: Tensor) -> Tensor | None:
        """[len(token_index)] weight of each token routed to ``expert`` (rows ``token_index`` of the routing), or
        None for unweighted rows."""
        return None

    def shared_weights(self, adapter: MoEAdapter, block: nn.Module, hidden: Tensor) -> Tensor | None:
        """[T] weight of each token of ``hidden`` [T, H] in the shared expert's Hessians, or None (unweighted)."""
        return None


@dataclass(frozen=True)
class RoutedHessian(ExpertHessian):
    """Every token routed to the expert counts once (GPTQModel's expert Hessian)."""

    name: str = "routed"


@dataclass(frozen=True)
class WeightedHessian(ExpertHessian):
    """Each routed token counts with its combine weight g_{t,e}; shared experts with their gate."""

    name: str = "weighted"

    def routed_weights(self, routing: Routing, expert: int, token_index: Tensor) -> Tensor:
        rows_indices, rows_weights = routing.indices[token_index], routing.weights[token_index]
        # a token picks an expert at most once, so the masked sum is its one combine weight
        return (rows_weights.float() * (rows_indices == expert)).sum(dim=-1)

    def shared_weights(self, adapter: MoEAdapter, block: nn.Module, hidden: Tensor) -> Tensor | None:
        gate = adapter.shared_expert_gate(block, hidden)
        return None if gate is None else gate.float().reshape(-1)


EXPERT_HESSIANS: dict[str, ExpertHessian] = {v.name: v for v in (RoutedHessian(), WeightedHessian())}


def get_expert_hessian(name: str) -> ExpertHessian:
    """The variant called ``name``; ValueError naming the choices otherwise."""
    try:
        return EXPERT_HESSIANS[name]
    except KeyError:
        raise ValueError(f"unknown expert Hessian {name!r}; choose from {', '.join(EXPERT_HESSIANS)}") from None


def weighted_rows(x: Tensor, weights: Tensor | None) -> Tensor:
    """Rows ``sqrt(w_t) x_t`` (x itself when ``weights`` is None): fed to GPTQ they give ``2/n sum_t w_t x_t x_t^T``."""
    if weights is None:
        return x
    return x * weights.to(device=x.device, dtype=x.dtype).clamp_min(0).sqrt().unsqueeze(-1)

