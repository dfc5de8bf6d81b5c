"""PESF: prefill expert skipping by selection frequency (EAC-MoE, section "PESF").

During prefill, for every MoE layer and every input sequence ``b`` of ``l_b`` real tokens, count how many of the
sequence's real tokens selected each expert (``c_e``). Expert ``e`` is skipped for that whole sequence when

    c_e < alpha * l_b * K / N          (N experts, top-K; l_b*K/N is the count under uniform routing)

The paper does not say what happens to the routing weight a skipped expert would have received. Both choices
are offered: ``renormalize=False`` drops it (the token's output shrinks), ``renormalize=True`` rescales the
token's remaining weights so they keep their original sum. Decoding (one new token per sequence) is never changed.

Padding never counts, so a sequence's output does not depend on what it is batched with. The MoE blocks are not
given the attention mask, so :func:`enable_pesf` records it where the model is entered; a block uses its last
``seq_len`` columns (with a KV cache the mask also covers the cached tokens; a 4-D mask, as ``generate`` passes
with a static cache, is read on its diagonal). Without a mask, a trailing run of token id 0 is taken as padding:
lm_eval's loglikelihood requests right-pad with 0 and pass no mask (see :func:`real_token_mask`). A sequence of at
most one real token in the block's input is left as it is, like a decoding step.

A skipped (token, slot) is marked the way transformers' eager experts loop marks a dropped token: expert index
``N`` (one past the last expert) with weight 0, which that loop and :class:`PackedExperts` both skip. So PESF
works on an FP model loaded with ``experts_implementation="eager"`` and on eacmoe's packed runtime alike.

This file imports only torch and the standard library: it is copied into every exported checkpoint (see
``eacmoe.runtime``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["UNMASKED_PAD_ID", "PESFConfig", "PESFStats", "apply_pesf", "disable_pesf", "enable_pesf", "install_pesf",
           "pesf_keep_mask", "real_token_mask", "selection_counts"]

UNMASKED_PAD_ID = 0  # what lm_eval right-pads loglikelihood batches with (it passes no attention mask)


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
    """Counters over all prefill calls of one MoE layer, real tokens only: how much work PESF removed."""

    sequences: int = 0
    expert_sequence_pairs: int = 0       # (sequence, expert) pairs with at least one selection
    skipped_expert_sequence_pairs: int = 0
    slots: int = 0                       # (real token, top-k slot) routing assignments
    skipped_slots: int = 0
    per_expert_skips: list[int] = field(default_factory=list)

    @property
    def skipped_slot_fraction(self) -> float:
        return self.skipped_slots / self.slots if self.slots else 0.0


def real_token_mask(attention_mask: Tensor | None, input_ids: Tensor | None, past_length: int = 0) -> Tensor | None:
    """bool ``[batch, length]``: which positions of a model call hold real tokens; None: all of them.

    A 2-D ``attention_mask`` decides (nonzero = real). A 4-D one (``[batch, heads, query, key]``, what ``generate``
    passes with a static cache; bool, or additive with 0 = attend) marks a query real where it attends to its own
    key, ``past_length`` (the tokens already cached) to the right of the diagonal. Without a mask, a trailing run
    of :data:`UNMASKED_PAD_ID` in ``input_ids`` is padding (how lm_eval batches loglikelihood requests); it is
    treated so for every sequence, batched or not, so a sequence gets the same answer either way. Anything else
    (only ``inputs_embeds``, a mask of another shape): every position is real.
    """
    if isinstance(attention_mask, Tensor):
        if attention_mask.dim() == 2:
            return attention_mask != 0
        if attention_mask.dim() == 4:
            own = attention_mask[:, 0].diagonal(offset=past_length, dim1=-2, dim2=-1)  # [batch, <= query]
            if own.shape[-1] == attention_mask.shape[-2]:
                return own if own.dtype == torch.bool else own == 0
        return None
    if isinstance(input_ids, Tensor) and input_ids.dim() == 2:
        trailing_pad = (input_ids == UNMASKED_PAD_ID).flip(-1).cumprod(-1).flip(-1).bool()
        return ~trailing_pad
    return None


def selection_counts(top_k_index: Tensor, batch: int, num_experts: int, real: Tensor | None = None) -> Tensor:
    """long ``[batch, num_experts]``: how many of each sequence's (token, slot) assignments chose each expert.

    ``top_k_index`` is ``[batch * seq_len, K]`` (a sequence's tokens contiguous, as the MoE blocks flatten them);
    slots already marked dropped (index ``num_experts``) and tokens that ``real`` (bool ``[batch, seq_len]``)
    marks as padding count for no expert.
    """
    index = top_k_index.reshape(batch, -1, top_k_index.shape[-1]).long()
    if real is not None:
        index = torch.where(real[:, :, None].to(index.device), index, torch.full_like(index, num_experts))
    index = index.reshape(batch, -1)
    counts = torch.zeros(batch, num_experts + 1, dtype=torch.long, device=index.device)
    counts.scatter_add_(1, index, torch.ones_like(index))
    return counts[:, :num_experts]


def pesf_keep_mask(counts: Tensor, seq_len: int | Tensor, top_k: int, alpha: float) -> Tensor:
    """bool ``[batch, num_experts]``: the experts each sequence keeps, ``c_e >= alpha * l * K / N``, from the
    :func:`selection_counts` ``c`` of sequences of ``l = seq_len`` real tokens (an int, or one per sequence)."""
    if isinstance(seq_len, Tensor):
        seq_len = seq_len.to(counts.device).reshape(-1, 1)
    return counts >= alpha * seq_len * top_k / counts.shape[-1]


def apply_pesf(top_k_index: Tensor, top_k_weights: Tensor, batch: int, seq_len: int, num_experts: int,
               config: PESFConfig, stats: PESFStats | None = None,
               real: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The routing of ``batch`` sequences of ``seq_len`` positions with rarely selected experts removed.

    ``real`` (bool ``[batch, seq_len]``, None: all real) marks the positions that count; a sequence's keep mask
    applies to all its positions (what padding computes does not matter). Returns new ``(top_k_index,
    top_k_weights)``; skipped slots get index ``num_experts`` and weight 0. ``seq_len == 1`` (decoding) returns
    the inputs unchanged, and so is every sequence with at most one real token.
    """
    if seq_len <= 1:
        return top_k_index, top_k_weights
    top_k = top_k_index.shape[-1]
    if real is not None:
        real = real.to(top_k_index.device)
        lengths = real.sum(dim=1)
    else:
        lengths = torch.full((batch,), seq_len, dtype=torch.long, device=top_k_index.device)
    prefilled = lengths > 1  # [B]: the sequences PESF applies to
    counts = selection_counts(top_k_index, batch, num_experts, real)
    keep = pesf_keep_mask(counts, lengths, top_k, config.alpha) | ~prefilled[:, None]  # [B, N]
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
        selected = (counts > 0) & prefilled[:, None]
        skipped = selected & ~keep
        counted = prefilled[:, None] if real is None else real & prefilled[:, None]  # [B, 1] or [B, L]
        valid = (top_k_index < num_experts) & counted.expand(batch, seq_len).reshape(-1, 1)
        stats.sequences += int(prefilled.sum())
        stats.expert_sequence_pairs += int(selected.sum())
        stats.skipped_expert_sequence_pairs += int(skipped.sum())
        stats.slots += int(valid.sum())
        stats.skipped_slots += int((valid & ~slot_keep).sum())
        per_expert = skipped.sum(dim=0).tolist()
        stats.per_expert_skips = [a + b for a, b in zip(stats.per_expert_skips or [0] * num_experts, per_expert)]
    return new_index, new_weights


class _RealTokens:
    """The :func:`real_token_mask` of the model call in progress (innermost first), recorded by hooks on the
    modules a caller enters the model through; empty outside a call (a block run on its own: all tokens real)."""

    def __init__(self) -> None:
        self.stack: list[Tensor | None] = []

    def current(self) -> Tensor | None:
        return self.stack[-1] if self.stack else None

    def hook(self, module: nn.Module) -> list:
        """Record at every call of ``module`` (a model or decoder taking ``input_ids`` / ``attention_mask``)."""
        names = list(inspect.signature(module.forward).parameters)

        def argument(name: str, args: tuple, kwargs: dict):
            if name in kwargs:
                return kwargs[name]
            position = names.index(name) if name in names else len(args)
            return args[position] if position < len(args) else None

        def push(_module, args, kwargs):
            cache = argument("cache", args, kwargs)  # transformers 5 name; past_key_values before
            if cache is None:
                cache = argument("past_key_values", args, kwargs)
            past_length = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
            self.stack.append(real_token_mask(argument("attention_mask", args, kwargs),
                                              argument("input_ids", args, kwargs), past_length))

        def pop(_module, _args, _kwargs, _output):
            self.stack.pop()

        return [module.register_forward_pre_hook(push, with_kwargs=True),
                module.register_forward_hook(pop, with_kwargs=True, always_call=True)]


def install_pesf(block: nn.Module, experts: nn.Module, num_experts: int, config: PESFConfig,
                 real_tokens: _RealTokens | None = None) -> tuple[PESFStats, list]:
    """Hook PESF into one MoE block: the block's input gives the (batch, seq_len) split of the flattened tokens
    its experts module then receives as ``(hidden_states, top_k_index, top_k_weights)``; ``real_tokens`` (set up
    by :func:`enable_pesf`) says which of them are padding.

    Returns the layer's :class:`PESFStats` and the hook handles (call ``.remove()`` on each to turn PESF off).
    """
    stats = PESFStats()
    shape: dict[str, tuple[int, int]] = {}
    chunk: dict[str, Tensor | None] = {}

    def record_shape(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, seq_len = (hidden.shape[0], hidden.shape[1]) if hidden.dim() == 3 else (1, hidden.shape[0])
        shape["bt"] = (batch, seq_len)
        real = real_tokens.current() if real_tokens is not None else None
        if real is not None and (real.shape[0] != batch or real.shape[1] < seq_len):
            raise ValueError(f"PESF: the attention mask {tuple(real.shape)} does not cover the MoE block's input "
                             f"(batch {batch}, {seq_len} tokens)")
        chunk["real"] = None if real is None else real[:, -seq_len:]  # with a KV cache: the newest columns

    def filter_routing(_module, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        batch, seq_len = shape.get("bt", (1, values["hidden_states"].shape[0]))
        if batch * seq_len != values["hidden_states"].shape[0]:  # called outside the block's forward
            return None
        index, weights = apply_pesf(values["top_k_index"], values["top_k_weights"], batch, seq_len, num_experts,
                                    config, stats, real=chunk.get("real"))
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
    ``{experts module path: PESFStats}``. Calling it again replaces the previous settings.

    The attention mask is recorded when ``model`` or its decoder (``model.base_model``) is called.
    """
    disable_pesf(model)
    implementation = getattr(getattr(model, "config", None), "_experts_implementation", None)
    real_tokens = _RealTokens()
    stats, handles = {}, []
    for name, module in list(model.named_modules()):
        if not _is_experts_module(module):
            continue
        if implementation not in (None, "eager") and type(module).__name__ != "PackedExperts":
            raise ValueError(f"PESF needs the eager experts loop (it marks skipped slots with index num_experts); "
                             f"load the model with experts_implementation='eager' (it uses {implementation!r})")
        block = model.get_submodule(name.rpartition(".")[0])
        stats[name], layer_handles = install_pesf(block, module, module.num_experts, config, real_tokens)
        handles += layer_handles
    if not stats:
        raise ValueError("no MoE experts module found: PESF applies to MoE models only")
    entries = [model] + [m for m in [getattr(model, "base_model", None)] if isinstance(m, nn.Module) and m is not model]
    for entry in entries:
        handles += real_tokens.hook(entry)
    model._pesf_handles = handles
    model.pesf_stats = stats
    return stats


def disable_pesf(model: nn.Module) -> None:
    """Remove the hooks of :func:`enable_pesf` (no-op if PESF is off)."""
    for handle in getattr(model, "_pesf_handles", []):
        handle.remove()
    model._pesf_handles = []
