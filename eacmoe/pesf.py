"""PESF: prefill expert skipping by selection frequency (EAC-MoE, section "PESF").

During prefill, for every MoE layer and every input sequence of length ``l``, count how many of the sequence's
tokens selected each expert (``c_e``). Expert ``e`` is skipped for that whole sequence when

    c_e < alpha * l * K / N            (N experts, top-K; l*K/N is the count under uniform routing)

The paper does not say what happens to the routing weight a skipped expert would have received. Both choices
are offered: ``renormalize=False`` drops it (the token's output shrinks), ``renormalize=True`` rescales the
token's remaining weights so they keep their original sum. Decoding (one token per sequence) is never changed.

A skipped (token, slot) is marked the way transformers' eager experts loop marks a dropped token: expert index
``N`` (one past the last expert) with weight 0, which that loop and :class:`PackedExperts` both skip. So PESF
works on an FP model loaded with ``experts_implementation="eager"`` and on eacmoe's packed runtime alike.

This file imports only torch: it is copied into every exported checkpoint (see ``eacmoe.runtime``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["PESFConfig", "PESFStats", "apply_pesf", "disable_pesf", "enable_pesf", "install_pesf", "pesf_keep_mask",
           "selection_counts"]


@dataclass(frozen=True)
class PESFConfig:
    """alpha: skip threshold as a fraction of the uniform count; renormalize: see the module docstring."""

    alpha: float = 0.3
    renormalize: bool = False

    def __post_init__(self) -> None:
        if not float(self.alpha) >= 0.0:  # also rejects NaN
            raise ValueError(f"PESF alpha must be a non-negative number, got {self.alpha!r}")


@dataclass
class PESFStats:
    """Counters over all prefill calls of one MoE layer: how much work PESF removed."""

    sequences: int = 0
    expert_sequence_pairs: int = 0       # (sequence, expert) pairs with at least one selection
    skipped_expert_sequence_pairs: int = 0
    slots: int = 0                       # (token, top-k slot) routing assignments
    skipped_slots: int = 0
    per_expert_skips: list[int] = field(default_factory=list)

    @property
    def skipped_slot_fraction(self) -> float:
        return self.skipped_slots / self.slots if self.slots else 0.0


def selection_counts(top_k_index: Tensor, batch: int, num_experts: int) -> Tensor:
    """long ``[batch, num_experts]``: how many of each sequence's (token, slot) assignments chose each expert.

    ``top_k_index`` is ``[batch * seq_len, K]`` (a sequence's tokens contiguous, as the MoE blocks flatten them);
    slots already marked dropped (index ``num_experts``) count for no expert.
    """
    index = top_k_index.reshape(batch, -1).long()
    counts = torch.zeros(batch, num_experts + 1, dtype=torch.long, device=index.device)
    counts.scatter_add_(1, index, torch.ones_like(index))
    return counts[:, :num_experts]


def pesf_keep_mask(counts: Tensor, seq_len: int, top_k: int, alpha: float) -> Tensor:
    """bool ``[batch, num_experts]``: the experts each sequence keeps, ``c_e >= alpha * l * K / N``, from the
    :func:`selection_counts` ``c`` of sequences of ``l = seq_len`` tokens."""
    return counts >= alpha * seq_len * top_k / counts.shape[-1]


def apply_pesf(top_k_index: Tensor, top_k_weights: Tensor, batch: int, seq_len: int, num_experts: int,
               config: PESFConfig, stats: PESFStats | None = None) -> tuple[Tensor, Tensor]:
    """The routing of ``batch`` sequences of ``seq_len`` tokens with rarely selected experts removed.

    Returns new ``(top_k_index, top_k_weights)``; skipped slots get index ``num_experts`` and weight 0.
    ``seq_len == 1`` (decoding) returns the inputs unchanged.
    """
    if seq_len <= 1:
        return top_k_index, top_k_weights
    top_k = top_k_index.shape[-1]
    counts = selection_counts(top_k_index, batch, num_experts)
    keep = pesf_keep_mask(counts, seq_len, top_k, config.alpha)  # [B, N]
    index = top_k_index.reshape(batch, seq_len, top_k)
    padded_keep = torch.cat([keep, torch.zeros_like(keep[:, :1])], dim=1)  # index N is never "kept"
    slot_keep = torch.gather(padded_keep, 1, index.reshape(batch, -1).long()).reshape(batch, seq_len, top_k)
    slot_keep = slot_keep.reshape(-1, top_k)
    new_weights = torch.where(slot_keep, top_k_weights, torch.zeros_like(top_k_weights))
    if config.renormalize:
        kept_sum = new_weights.sum(dim=-1, keepdim=True)
        scale = torch.where(kept_sum > 0, top_k_weights.sum(dim=-1, keepdim=True) / kept_sum.clamp_min(1e-30),
                            torch.zeros_like(kept_sum))
        new_weights = new_weights * scale
    new_index = torch.where(slot_keep, top_k_index, torch.full_like(top_k_index, num_experts))
    if stats is not None:
        skipped = (counts > 0) & ~keep
        valid = top_k_index < num_experts
        stats.sequences += batch
        stats.expert_sequence_pairs += int((counts > 0).sum())
        stats.skipped_expert_sequence_pairs += int(skipped.sum())
        stats.slots += int(valid.sum())
        stats.skipped_slots += int((valid & ~slot_keep).sum())
        per_expert = skipped.sum(dim=0).tolist()
        stats.per_expert_skips = [a + b for a, b in zip(stats.per_expert_skips or [0] * num_experts, per_expert)]
    return new_index, new_weights


def install_pesf(block: nn.Module, experts: nn.Module, num_experts: int, config: PESFConfig) -> tuple[PESFStats, list]:
    """Hook PESF into one MoE block: the block's input gives the (batch, seq_len) split of the flattened tokens
    its experts module then receives as ``(hidden_states, top_k_index, top_k_weights)``.

    Returns the layer's :class:`PESFStats` and the hook handles (call ``.remove()`` on each to turn PESF off).
    """
    stats = PESFStats()
    shape: dict[str, tuple[int, int]] = {}

    def record_shape(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        shape["bt"] = (hidden.shape[0], hidden.shape[1]) if hidden.dim() == 3 else (1, hidden.shape[0])

    def filter_routing(_module, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        batch, seq_len = shape.get("bt", (1, values["hidden_states"].shape[0]))
        if batch * seq_len != values["hidden_states"].shape[0]:  # called outside the block's forward
            return None
        index, weights = apply_pesf(values["top_k_index"], values["top_k_weights"], batch, seq_len, num_experts,
                                    config, stats)
        values.update(top_k_index=index, top_k_weights=weights)
        n_args = len(args)
        return tuple(values[n] for n in names[:n_args]), {n: values[n] for n in names[n_args:] if n in values}

    handles = [block.register_forward_pre_hook(record_shape, with_kwargs=True),
               experts.register_forward_pre_hook(filter_routing, with_kwargs=True)]
    return stats, handles


def _is_experts_module(module: nn.Module) -> bool:
    """A transformers 5 fused experts module (3-D ``gate_up_proj``) or eacmoe's PackedExperts: both take
    ``(hidden_states, top_k_index, top_k_weights)`` and skip index ``num_experts``."""
    if not isinstance(getattr(module, "num_experts", None), int):
        return False
    gate_up = getattr(module, "gate_up_proj", None)
    return (isinstance(gate_up, Tensor) and gate_up.dim() == 3) or type(module).__name__ == "PackedExperts"


def enable_pesf(model: nn.Module, config: PESFConfig) -> dict[str, PESFStats]:
    """Turn PESF on in every MoE block of ``model`` (FP with eager experts, or packed); returns
    ``{experts module path: PESFStats}``. Calling it again replaces the previous settings."""
    disable_pesf(model)
    implementation = getattr(getattr(model, "config", None), "_experts_implementation", None)
    stats, handles = {}, []
    for name, module in list(model.named_modules()):
        if not _is_experts_module(module):
            continue
        if implementation not in (None, "eager") and type(module).__name__ != "PackedExperts":
            raise ValueError(f"PESF needs the eager experts loop (it marks skipped slots with index num_experts); "
                             f"load the model with experts_implementation='eager' (it uses {implementation!r})")
        block = model.get_submodule(name.rpartition(".")[0])
        stats[name], layer_handles = install_pesf(block, module, module.num_experts, config)
        handles += layer_handles
    if not stats:
        raise ValueError("no MoE experts module found: PESF applies to MoE models only")
    model._pesf_handles = handles
    model.pesf_stats = stats
    return stats


def disable_pesf(model: nn.Module) -> None:
    """Remove the hooks of :func:`enable_pesf` (no-op if PESF is off)."""
    for handle in getattr(model, "_pesf_handles", []):
        handle.remove()
    model._pesf_handles = []
