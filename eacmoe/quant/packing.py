"""Bit packing of :class:`QuantizedWeight` in the GPTQ checkpoint convention (AutoGPTQ / GPTQModel, format "gptq").

Per quantized Linear with ``K`` input features, ``N`` output features, group size ``G`` and ``b`` bits::

    qweight  int32 [ceil(K*b/32), N]     codes, packed along the input dimension
    qzeros   int32 [K/G, ceil(N*b/32)]   zero points, packed along the output dimension
    scales   fp16  [K/G, N]
    g_idx    int32 [K]                   group of every input column (not monotone after act-order)

Layout: the values of one packed dimension form one little-endian bit stream, value ``j`` occupying bits
``b*j .. b*j+b-1``, cut into 32-bit words (word ``w`` holds stream bits ``32*w .. 32*w+31``, bit 0 = LSB). For
b in 2/4/8 a value never straddles a word, so value ``j`` sits at bit offset ``b*(j mod 32/b)`` of word
``j // (32/b)``. For b = 3 this is exactly GPTQModel's "10 | 1 | 10 | 1 | 10" scheme (32 values in 3 words):
value 10 puts its low 2 bits at bits 30-31 of word 0 and its high bit at bit 0 of word 1, value 21 puts its
low bit at bit 31 of word 1 and its high 2 bits at bits 0-1 of word 2 (``pack_original`` / ``_pack_rows_3``
in ``gptqmodel/nn_modules/qlinear/__init__.py``).

Shapes: for b in 2/4/8 a dimension that is not a multiple of ``32/b`` is zero-padded to whole words, as
GPTQModel's ``pack_original`` does (``ceil``); 3-bit packing works on whole 32-value blocks, so 3-bit needs
``K`` and ``N`` to be multiples of 32 (GPTQModel's 3-bit kernels and unpackers require the same).

Zero points, format "gptq" (v1): the checkpoint stores ``zero - 1``. Exactly as GPTQModel's
``convert_gptq_v2_to_v1_format_module`` (used when it saves format "gptq") and its loader
``convert_gptq_v1_to_v2_format_module`` do it:

- b in 2/4/8: one *word-level* subtraction of the constant with a 1 in every field (e.g. ``0x11111111`` for
  4 bits), modulo 2**32. A zero point of 0 therefore borrows from the next field. GPTQModel adds the same
  constant back on load, so the round trip is exact, but a reader that decodes each field and adds 1 (old
  AutoGPTQ/ExLlama kernels) gets a wrong zero next to a zero point of 0 -- a limitation of the v1 format itself
  (``zero - 1 = -1`` has no b-bit field representation), which is why GPTQModel prefers format "gptq_v2".
- b = 3: per field, ``(zero - 1) mod 8`` (GPTQModel decodes, shifts and re-packs the fields for int32 words).

Format "gptq_v2" stores the zero points unchanged.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from .grid import SUPPORTED_BITS, QuantizedWeight

__all__ = [
    "GPTQ_FORMATS",
    "WORD_BITS",
    "gptq_tensor_shapes",
    "pack_cols",
    "pack_gptq",
    "pack_rows",
    "packed_length",
    "unpack_cols",
    "unpack_gptq",
    "unpack_rows",
]

logger = logging.getLogger(__name__)

WORD_BITS = 32
GPTQ_FORMATS = ("gptq", "gptq_v2")
_MASK32 = (1 << WORD_BITS) - 1


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _block_values(bits: int) -> int:
    """Values per packing block: one word for 2/4/8 bits, 32 values (3 words) for 3 bits."""
    return WORD_BITS // bits if WORD_BITS % bits == 0 else WORD_BITS


def packed_length(num_values: int, bits: int) -> int:
    """Number of int32 words that hold ``num_values`` codes of ``bits`` bits (``ceil(num_values*bits/32)``).

    Raises ValueError for 3-bit codes when ``num_values`` is not a multiple of 32 (the 3-bit layout packs whole
    32-value blocks into 3 words).
    """
    _check_bits(bits)
    if num_values < 0:
        raise ValueError(f"num_values must be >= 0, got {num_values}")
    block = _block_values(bits)
    if bits == 3 and num_values % block != 0:
        raise ValueError(
            f"3-bit GPTQ packing needs a multiple of 32 values along the packed dimension, got {num_values}"
        )
    return -(-num_values * bits // WORD_BITS)


def _to_int32_words(words: Tensor) -> Tensor:
    """int64 values in [0, 2**32) -> int32 with the same bit pattern (explicit wrap, no reliance on casts)."""
    words = words & _MASK32
    return torch.where(words >= (1 << 31), words - (1 << WORD_BITS), words).to(torch.int32)


def pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack integer codes ``[R, C]`` along dim 0 into int32 ``[ceil(R*bits/32), C]`` (the ``qweight`` layout).

    ``values`` may have any integer dtype; every value must lie in ``[0, 2**bits - 1]``.
    """
    _check_bits(bits)
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D, got shape {tuple(values.shape)}")
    if values.dtype.is_floating_point or values.dtype == torch.bool:
        raise TypeError(f"values must have an integer dtype, got {values.dtype}")
    rows, cols = values.shape
    n_words = packed_length(rows, bits)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > (1 << bits) - 1):
        raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    # Codes fit in int16; only one [blocks, N] slice at a time is widened to int64 (an expert matrix of
    # 58M codes would otherwise take 470 MB as int64).
    v = values.to(torch.int16)
    block = _block_values(bits)
    words_per_block = block * bits // WORD_BITS
    padded = -(-rows // block) * block
    if padded != rows:  # zero-fill the tail of the last word, as GPTQModel's pack_original does
        v = torch.cat([v, v.new_zeros(padded - rows, cols)])
    v = v.view(padded // block, block, cols)
    out = torch.zeros(padded // block, words_per_block, cols, dtype=torch.int64, device=values.device)
    # Fields never overlap, so adding the shifted values is the same as OR-ing them.
    for pos in range(block):
        word, shift = divmod(pos * bits, WORD_BITS)
        value = v[:, pos].to(torch.int64)
        out[:, word] += (value << shift) & _MASK32
        spill = shift + bits - WORD_BITS
        if spill > 0:  # 3-bit values 10 and 21 straddle two words
            out[:, word + 1] += value >> (bits - spill)
    return _to_int32_words(out.view(-1, cols)[:n_words])


def unpack_rows(packed: Tensor, bits: int, num_rows: int) -> Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[ceil(num_rows*bits/32), C]`` -> int32 codes ``[num_rows, C]``."""
    _check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D, got shape {tuple(packed.shape)}")
    n_words = packed_length(num_rows, bits)
    if packed.shape[0] != n_words:
        raise ValueError(
            f"{num_rows} values of {bits} bits need {n_words} packed words along dim 0, got {packed.shape[0]}"
        )
    cols = packed.shape[1]
    mask = (1 << bits) - 1
    if WORD_BITS % bits == 0:
        # Fields never straddle words: one broadcast shift extracts them all (the runtime's hot path). An
        # arithmetic shift of a negative int32 only changes bits above the field, which the mask drops.
        shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32, device=packed.device)
        values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask  # [words, values per word, C]
        return values.reshape(-1, cols)[:num_rows]
    block = _block_values(bits)
    words_per_block = block * bits // WORD_BITS
    n_blocks = -(-num_rows // block)
    w = packed.to(torch.int64) & _MASK32  # unsigned view of the int32 words
    if n_blocks * words_per_block != n_words:
        w = torch.cat([w, w.new_zeros(n_blocks * words_per_block - n_words, cols)])
    w = w.view(n_blocks, words_per_block, cols)
    out = torch.empty(n_blocks, block, cols, dtype=torch.int32, device=packed.device)
    for pos in range(block):
        word, shift = divmod(pos * bits, WORD_BITS)
        value = w[:, word] >> shift
        spill = shift + bits - WORD_BITS
        if spill > 0:
            value = value | (w[:, word + 1] << (bits - spill))
        out[:, pos] = value & mask
    return out.view(-1, cols)[:num_rows]


def pack_cols(values: Tensor, bits: int) -> Tensor:
    """Pack integer codes ``[R, C]`` along dim 1 into int32 ``[R, ceil(C*bits/32)]`` (the ``qzeros`` layout)."""
    return pack_rows(values.T, bits).T.contiguous()


def unpack_cols(packed: Tensor, bits: int, num_cols: int) -> Tensor:
    """Inverse of :func:`pack_cols`: int32 ``[R, ceil(num_cols*bits/32)]`` -> int32 codes ``[R, num_cols]``."""
    return unpack_rows(packed.T, bits, num_cols).T.contiguous()


def _v1_offset_constant(bits: int) -> int:
    """The word with a 1 in the lowest bit of every ``bits``-wide field (2/4/8 bits), e.g. 0x11111111 for 4."""
    return sum(1 << (bits * j) for j in range(WORD_BITS // bits))


def _zeros_to_v1(qzeros_v2: Tensor, bits: int, num_cols: int) -> Tensor:
    """v2 (plain) packed zero points -> v1 (``zero - 1``), exactly as GPTQModel does on save."""
    if bits == 3:
        zeros = unpack_cols(qzeros_v2, bits, num_cols)
        return pack_cols((zeros - 1) & 0x7, bits)
    return _to_int32_words(qzeros_v2.to(torch.int64) - _v1_offset_constant(bits))


def _zeros_from_v1(qzeros_v1: Tensor, bits: int, num_cols: int) -> Tensor:
    """Inverse of :func:`_zeros_to_v1` (GPTQModel's load-side correction)."""
    if bits == 3:
        zeros = unpack_cols(qzeros_v1, bits, num_cols)
        return pack_cols((zeros + 1) & 0x7, bits)
    return _to_int32_words(qzeros_v1.to(torch.int64) + _v1_offset_constant(bits))


def gptq_tensor_shapes(in_features: int, out_features: int, bits: int, n_groups: int) -> dict[str, tuple[int, ...]]:
    """Shapes of ``qweight``/``qzeros``/``scales``/``g_idx`` for one Linear (``n_groups`` = K/G, or 1)."""
    return {
        "qweight": (packed_length(in_features, bits), out_features),
        "qzeros": (n_groups, packed_length(out_features, bits)),
        "scales": (n_groups, out_features),
        "g_idx": (in_features,),
    }


def pack_gptq(qw: QuantizedWeight, format: str = "gptq") -> dict[str, Tensor]:
    """``{"qweight", "qzeros", "scales", "g_idx"}`` of one quantized Linear in the GPTQ checkpoint convention.

    Args:
        qw: codes ``[N, K]``, scales/zeros ``[N, G]``, g_idx ``[K]``.
        format: "gptq" (v1, zero points stored minus one; what GPTQModel writes by default) or "gptq_v2".

    The fp32 scales are rounded to fp16 (the convention's storage type); a scale that overflows fp16 raises,
    one that underflows to 0 is logged, because either would dequantize the whole group wrongly.
    """
    _check_bits(qw.bits)
    if format not in GPTQ_FORMATS:
        raise ValueError(f"format must be one of {GPTQ_FORMATS}, got {format!r}")
    out_features, in_features = qw.codes.shape
    codes = qw.codes.to(torch.int64)
    zeros = qw.zeros.to(torch.int64)
    qweight = pack_rows(codes.T, qw.bits)  # [K*b/32, N]
    qzeros = pack_cols(zeros.T, qw.bits)  # [G, N*b/32]
    if format == "gptq":
        qzeros = _zeros_to_v1(qzeros, qw.bits, out_features)
    scales = qw.scales.T.contiguous().to(torch.float16)  # [G, N]
    if not torch.isfinite(scales).all():
        raise ValueError("a scale does not fit in fp16 (|scale| > 65504); the GPTQ convention stores fp16 scales")
    underflow = int(((scales == 0) & (qw.scales.T != 0)).sum())
    if underflow:
        logger.warning("%d scale(s) underflow to 0 in fp16; those groups dequantize to 0", underflow)
    return {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": scales,
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(
    tensors: dict[str, Tensor], bits: int, group_size: int, sym: bool, format: str = "gptq"
) -> QuantizedWeight:
    """Inverse of :func:`pack_gptq`: a :class:`QuantizedWeight` (codes uint8 ``[N, K]``, scales fp32 ``[N, G]``).

    ``K`` is taken from ``g_idx`` when present (it is needed for 2/4/8-bit tensors whose ``K`` is not a multiple
    of the words' value count); without ``g_idx``, ``K`` is the packed capacity and ``g_idx`` is rebuilt as
    ``arange(K) // group_size``. Scales come back as fp32 copies of the stored fp16 values.
    """
    _check_bits(bits)
    if format not in GPTQ_FORMATS:
        raise ValueError(f"format must be one of {GPTQ_FORMATS}, got {format!r}")
    missing = {"qweight", "qzeros", "scales"} - set(tensors)
    if missing:
        raise KeyError(f"missing GPTQ tensor(s): {sorted(missing)}")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    out_features = int(qweight.shape[1])
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        in_features = int(g_idx.shape[0])
    else:
        in_features = int(qweight.shape[0]) * WORD_BITS // bits
        width = in_features if group_size == -1 else group_size
        g_idx = torch.arange(in_features, dtype=torch.int32) // width
    n_groups = int(scales.shape[0])
    expected = gptq_tensor_shapes(in_features, out_features, bits, n_groups)
    for name, tensor in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
    if format == "gptq":
        qzeros = _zeros_from_v1(qzeros, bits, out_features)
    codes = unpack_rows(qweight, bits, in_features).T  # [N, K]
    zeros = unpack_cols(qzeros, bits, out_features).T  # [N, G]
    return QuantizedWeight(
        codes=codes.to(torch.uint8).contiguous(),
        scales=scales.T.to(torch.float32).contiguous(),
        zeros=zeros.to(torch.uint8).contiguous(),
        g_idx=g_idx.to(torch.int32).contiguous(),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )
