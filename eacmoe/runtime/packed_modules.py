"""Packed low-bit modules: the weights stay packed in memory and are dequantized at each forward.

- :class:`PackedLinear` replaces an ``nn.Linear`` (attention projections, shared experts).
- :class:`PackedExperts` replaces a transformers 5 fused experts module (``mlp.experts`` with 3-D
  ``gate_up_proj`` / ``down_proj``). It takes the same ``(hidden_states, top_k_index, top_k_weights)`` call and
  dequantizes only the experts the current tokens were routed to, one at a time, so a layer's full-precision
  expert weights never exist in memory together.

Tensors follow the GPTQ convention (``qweight``/``qzeros``/``scales``/``g_idx`` per Linear, experts named
``experts.{e}.{gate_proj,up_proj,down_proj}`` as GPTQModel names them), with plain zero points ("gptq_v2"). The
dequantized weight is computed with exactly the fp32 arithmetic of ``QuantizedWeight.dequantize``, so a packed
model reproduces the in-memory quantized model it came from.

Memory: a weight is dequantized straight into a tensor of the compute dtype, a tile of input features at a time
(each tile computed in fp32 and cast, which rounds exactly as casting the whole fp32 matrix would: the fp32 product
of a small integer and an fp16 scale is exact). The transient is that one weight in the compute dtype plus a few
tile-sized temporaries (``TILE_BYTES`` each: unpacking, gathered zeros and scales), instead of five whole fp32 matrices (codes, zeros, scales, product, transpose:
about 1.2 GB per Mixtral-8x7B expert matrix).

This file is copied into exported checkpoints: it imports only torch and the other copied files.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # a flat copy inside an exported checkpoint
    from .grid import QuantizedWeight
    from .packing import gptq_tensor_shapes, pack_gptq, unpack_cols, unpack_rows
except ImportError:  # the installed eacmoe package
    from eacmoe.quant.grid import QuantizedWeight
    from eacmoe.quant.packing import gptq_tensor_shapes, pack_gptq, unpack_cols, unpack_rows

__all__ = ["EXPERT_PROJS", "PackedExperts", "PackedLinear", "replace_module"]

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
TILE_BYTES = 16 * 2**20  # fp32 bytes of one dequantization tile (rows of input features, a multiple of 32)


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as packed b-bit codes, fp16 scales and packed zero points.

    The scales are kept as the int16 bit pattern of their fp16 values, so that ``model.to(dtype)`` (which casts
    every floating-point buffer) cannot round them; ``state_dict`` and loading use ordinary fp16 tensors.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool = False,
                 bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        n_groups = 1 if group_size == -1 else in_features // group_size
        shapes = gptq_tensor_shapes(in_features, out_features, bits, n_groups)
        self.register_buffer("qweight", torch.zeros(shapes["qweight"], dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(shapes["qzeros"], dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(shapes["scales"], dtype=torch.int16))
        self.register_buffer("g_idx", torch.zeros(shapes["g_idx"], dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None = None) -> "PackedLinear":
        out_features, in_features = qw.shape
        module = cls(in_features, out_features, qw.bits, qw.group_size, qw.sym, bias is not None,
                     bias.dtype if bias is not None else torch.float32)
        packed = pack_gptq(qw, format="gptq_v2")
        module.qweight.copy_(packed["qweight"])
        module.qzeros.copy_(packed["qzeros"])
        module.scales.copy_(packed["scales"].view(torch.int16))
        module.g_idx.copy_(packed["g_idx"])
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def tile_rows(self) -> int:
        """Input features dequantized at a time: a multiple of 32 (whole packed words for every bit width)."""
        return max(32, TILE_BYTES // (4 * self.out_features) // 32 * 32)

    def dequantize_into(self, out: Tensor) -> Tensor:
        """Write the ``[out, in]`` weight ``(code - zero) * scale`` into ``out`` (any float dtype, e.g. a slice of a
        larger matrix), one tile of input features at a time; each tile in fp32 (the arithmetic of
        ``QuantizedWeight.dequantize``) and then cast, so the result is bit-identical to dequantizing the whole
        matrix in fp32 and casting it."""
        if out.shape != (self.out_features, self.in_features):
            raise ValueError(f"out must be [{self.out_features}, {self.in_features}], got {tuple(out.shape)}")
        zeros = unpack_cols(self.qzeros, self.bits, self.out_features).float()  # [G, N]
        scales = self.scales.view(torch.float16).float()  # [G, N]
        group = self.g_idx.long()
        step = self.tile_rows()
        for k0 in range(0, self.in_features, step):
            k1 = min(k0 + step, self.in_features)
            words = self.qweight[k0 * self.bits // 32: -(-k1 * self.bits // 32)]
            tile = unpack_rows(words, self.bits, k1 - k0).float()  # [tile, N]
            g = group[k0:k1]
            tile.sub_(zeros[g]).mul_(scales[g])  # (code - zero) * scale, the same two fp32 roundings
            out[:, k0:k1].copy_(tile.T)
            del tile
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ``[out, in]`` weight in ``dtype``, contiguous (the same matmul as an nn.Linear weight); bit-identical
        to ``QuantizedWeight.dequantize().to(dtype)`` (see :meth:`dequantize_into`)."""
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.qweight.device)
        return self.dequantize_into(out)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "scales"] = self.scales.view(torch.float16)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "scales"
        if key in state_dict and state_dict[key].dtype == torch.float16:
            state_dict[key] = state_dict[key].view(torch.int16)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}")


class PackedExperts(nn.Module):
    """Drop-in replacement of a fused experts module whose experts are packed :class:`PackedLinear` triples.

    ``forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K])`` matches transformers' eager
    experts loop: ``out[t] = sum_k w[t, k] * down(act(gate(x_t)) * up(x_t))`` over the experts that ``t`` chose;
    index ``num_experts`` marks a dropped slot (PESF), which is skipped.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bits: int | list[int],
                 group_size: int, sym: bool, act_fn: nn.Module):
        """``bits``: one width for every expert, or a list with one width per expert (a per-module schedule)."""
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        expert_bits = [int(b) for b in bits] if isinstance(bits, (list, tuple)) else [int(bits)] * num_experts
        if len(expert_bits) != num_experts:
            raise ValueError(f"{len(expert_bits)} bit widths for {num_experts} experts")
        self.expert_bits = expert_bits
        # one int when the experts agree (the layout of per-layer schedules), else the per-expert list
        self.bits = expert_bits[0] if len(set(expert_bits)) == 1 else list(expert_bits)
        self.group_size, self.sym = group_size, sym
        self.act_fn = act_fn
        shapes = {"gate_proj": (hidden_size, intermediate_size), "up_proj": (hidden_size, intermediate_size),
                  "down_proj": (intermediate_size, hidden_size)}
        for e in range(num_experts):
            expert = nn.Module()
            for proj, (fan_in, fan_out) in shapes.items():
                expert.add_module(proj, PackedLinear(fan_in, fan_out, expert_bits[e], group_size, sym))
            self.add_module(str(e), expert)

    def expert(self, e: int) -> nn.Module:
        return self.get_submodule(str(e))

    @classmethod
    def from_quantized(cls, experts: dict[int, dict[str, QuantizedWeight]], act_fn: nn.Module) -> "PackedExperts":
        """``experts[e][proj]`` for every expert ``e`` and projection in EXPERT_PROJS (one group size and symmetry
        for the layer; the width may differ between experts, not between the projections of one expert)."""
        first = experts[0]["gate_proj"]
        intermediate_size, hidden_size = first.shape
        bits = [experts[e]["gate_proj"].bits for e in range(len(experts))]
        for e in range(len(experts)):
            if any(experts[e][proj].bits != bits[e] for proj in EXPERT_PROJS):
                raise ValueError(f"expert {e}: its projections have different widths")
        module = cls(len(experts), hidden_size, intermediate_size, bits, first.group_size, first.sym, act_fn)
        for e, projections in experts.items():
            for proj in EXPERT_PROJS:
                module.expert(e).add_module(proj, PackedLinear.from_quantized(projections[proj]))
        return module

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index)
        for e in hit.tolist():
            if e >= self.num_experts:  # dropped slot
                continue
            slot, token_idx = torch.where(top_k_index.T == e)  # eager's order: by slot, then token
            expert = self.expert(e)
            x = hidden_states[token_idx]
            # gate and up as one matmul, like the fused eager path, so the results agree bit for bit; dequantized
            # straight into the halves of one matrix of the compute dtype (no fp32 copy, no concatenation)
            gate_up = x.new_empty(2 * self.intermediate_size, self.hidden_size)
            expert.gate_proj.dequantize_into(gate_up[: self.intermediate_size])
            expert.up_proj.dequantize_into(gate_up[self.intermediate_size:])
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, expert.down_proj.dequantized_weight(x.dtype))
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, bits={self.bits}, group_size={self.group_size}")


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
