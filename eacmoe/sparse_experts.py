"""What a routed expert that got too few calibration tokens is quantized with (`--sparse-expert-policy`).

GPTQ's Hessian of an expert routed n tokens has rank at most n: with fewer tokens than its input width it is
singular, held up only by the damping, and GPTQ fits the few tokens it saw at the expense of everything else. Such
an expert is "sparse"; a policy decides which experts are sparse (a token threshold) and what a sparse expert is
quantized with instead. Every other expert is calibrated on its own routed tokens, weighted as `--expert-hessian`
says (expert_hessian.py).

Policies (one object each; `SPARSE_EXPERT_POLICIES` is the one place to add another):

- ``pool`` (the default): under ``min_expert_tokens`` (default: the expert's input width) GPTQ on every token of the
  layer, unweighted: the layer's whole token distribution stands in for the expert's own.
- ``rtn``: under ``min_expert_tokens``, round to nearest (no Hessian).
- ``gptqmodel``: GPTQModel 7.6's FailSafe rule: round to nearest when the expert got fewer than 0.5% of the
  calibration tokens (``min_expert_tokens`` does not apply).
- ``weighted-pool``: under ``min_expert_tokens``, GPTQ on every token of the layer, token t with weight
  ``p_{t,e}``, the router's probability of the expert for that token before top-k
  (`MoEAdapter.expert_probabilities`: the softmax over all experts, DeepSeek-V3's sigmoid score), fed to the
  solver as rows ``sqrt(p_{t,e}) x_t`` exactly as the routing-weighted Hessian feeds its weights
  (`expert_hessian.weighted_rows`). Tokens the router would send there carry the most weight, so the pool leans
  toward the expert's own distribution while still having full rank.

The pipeline builds one `LayerRouting` per MoE layer and asks the policy once per expert
(`SparseExpertPolicy.select`), which returns an `ExpertTokens`: RTN or not, which rows of the layer's expert input,
and their Hessian row weights.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from .adapters import Routing
from .expert_hessian import ExpertHessian, RoutedHessian

__all__ = ["SPARSE_EXPERT_POLICIES", "ExpertTokens", "LayerRouting", "SparseExpertPolicy", "get_sparse_expert_policy",
           "policy_help"]


@dataclass(frozen=True)
class ExpertTokens:
    """How one routed expert is calibrated."""

    sparse: bool                  # it fell under the policy's token threshold (counted in the layer report)
    rtn: bool                     # round to nearest: no Hessian (token_index and row_weights unused)
    token_index: Tensor | None    # rows of the layer's expert input its Hessians see; None = every row
    row_weights: Tensor | None    # one weight per selected row (rows enter as sqrt(w) x); None = unweighted


@dataclass
class LayerRouting:
    """What the policies need of one MoE layer: its routing on the calibration tokens, their number, the expert
    Hessian variant for experts calibrated on their own tokens, ``--min-expert-tokens`` and (for
    ``weighted-pool``) the router's [T, E] expert probabilities, computed on first use."""

    routing: Routing
    total_tokens: int
    hessian: ExpertHessian = field(default_factory=RoutedHessian)
    min_expert_tokens: int | None = None
    probabilities: Callable[[], Tensor] | None = None
    _probabilities: Tensor | None = field(default=None, init=False, repr=False)

    def expert_probabilities(self) -> Tensor:
        """[T, E] probability of each expert for each token (computed once per layer)."""
        if self._probabilities is None:
            if self.probabilities is None:
                raise ValueError("this policy needs the router's expert probabilities (LayerRouting.probabilities)")
            self._probabilities = self.probabilities()
        return self._probabilities


class SparseExpertPolicy:
    """The base class: an expert is sparse under ``min_expert_tokens`` (default: its input width); subclasses say
    what a sparse expert is quantized with (`sparse_tokens`) and may change the threshold."""

    name: str = ""
    description: str = ""              # one phrase for --help
    uses_min_expert_tokens: bool = True  # False: --min-expert-tokens has no effect (job_checks says so)

    def threshold(self, input_width: int, layer: LayerRouting) -> float:
        """The fewest routed tokens an expert may have to be calibrated on its own ones."""
        return layer.min_expert_tokens if layer.min_expert_tokens is not None else input_width

    def sparse_tokens(self, expert: int, layer: LayerRouting) -> ExpertTokens:
        raise NotImplementedError

    def select(self, expert: int, token_index: Tensor, input_width: int, layer: LayerRouting) -> ExpertTokens:
        """How ``expert`` (routed the rows ``token_index`` of the layer's tokens; ``input_width`` = the input width
        of its gate/up projections) is calibrated."""
        if token_index.numel() >= self.threshold(input_width, layer):
            return ExpertTokens(sparse=False, rtn=False, token_index=token_index,
                                row_weights=layer.hessian.routed_weights(layer.routing, expert, token_index))
        return self.sparse_tokens(expert, layer)


_RTN = ExpertTokens(sparse=True, rtn=True, token_index=None, row_weights=None)


class PoolPolicy(SparseExpertPolicy):
    name = "pool"
    description = "GPTQ on every token of the layer, unweighted"

    def sparse_tokens(self, expert: int, layer: LayerRouting) -> ExpertTokens:
        return ExpertTokens(sparse=True, rtn=False, token_index=None, row_weights=None)


class RTNPolicy(SparseExpertPolicy):
    name = "rtn"
    description = "round-to-nearest"

    def sparse_tokens(self, expert: int, layer: LayerRouting) -> ExpertTokens:
        return _RTN


# GPTQModel 7.6.0: gptqmodel/quantization/config.py `Fallback` (strategy RTN, threshold "0.5%", on by default);
# gptqmodel/utils/fallback.py `resolve_threshold` turns "0.5%" into (0.5 / 100.0) * expected_total_samples and
# `should_use_fallback` falls back when observed_samples < that value (strict). GPTQ.quantize
# (gptqmodel/quantization/gptq.py) calls it with the module's self.nsamples (rows = tokens it was fed: for an
# expert, the tokens routed to it) and expected_nsamples = LoopProcessor.total_calibration_tokens
# (gptqmodel/looper/loop_processor.py `_compute_total_tokens`: the attention-mask sum over the calibration set).
# An expert sees only its routed tokens there unless QuantizeConfig.moe asks otherwise (its default is None;
# ExpertsRoutingBypass / ExpertsRoutingOverride in gptqmodel/quantization/config.py would feed it more).
GPTQMODEL_FALLBACK_PERCENT = 0.5


class GPTQModelPolicy(RTNPolicy):
    name = "gptqmodel"
    description = (f"GPTQModel 7.6's FailSafe: round-to-nearest under {GPTQMODEL_FALLBACK_PERCENT}% of the "
                   "calibration tokens instead of under --min-expert-tokens")
    uses_min_expert_tokens = False

    def threshold(self, input_width: int, layer: LayerRouting) -> float:
        return (GPTQMODEL_FALLBACK_PERCENT / 100.0) * float(layer.total_tokens)


class WeightedPoolPolicy(SparseExpertPolicy):
    name = "weighted-pool"
    description = ("GPTQ on every token of the layer, each weighted by the router's probability of the expert "
                   "for it (softmax over all experts)")

    def sparse_tokens(self, expert: int, layer: LayerRouting) -> ExpertTokens:
        return ExpertTokens(sparse=True, rtn=False, token_index=None,
                            row_weights=layer.expert_probabilities()[:, expert].float())


SPARSE_EXPERT_POLICIES: dict[str, SparseExpertPolicy] = {
    p.name: p for p in (PoolPolicy(), RTNPolicy(), GPTQModelPolicy(), WeightedPoolPolicy())}


def get_sparse_expert_policy(name: str) -> SparseExpertPolicy:
    """The policy called ``name``; ValueError naming the choices otherwise."""
    try:
        return SPARSE_EXPERT_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown sparse expert policy {name!r}; choose from "
                         f"{', '.join(SPARSE_EXPERT_POLICIES)}") from None


def policy_help() -> str:
    """--help text of --sparse-expert-policy: what each policy does."""
    return ("an expert routed fewer calibration tokens than --min-expert-tokens (default: its input width) is "
            "quantized with: " + "; ".join(f"{p.name} = {p.description}" for p in SPARSE_EXPERT_POLICIES.values())
            + "; counted in the log and report").replace("%", "%%")  # argparse formats help with %
