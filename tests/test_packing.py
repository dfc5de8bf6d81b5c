"""GPTQ bit packing (eacmoe.quant.packing): round trips, layout details, and an independent check against
GPTQModel's own packer (``pack_original`` + its v2 -> v1 zero-point conversion) and dequantizer."""
from __future__ import annotations

import pytest
import torch
from gptqmodel_env import gptqmodel_import_guard, leaked_hf_cache_vars

from eacmoe.quant import QuantizedWeight, QuantSpec, rtn_quantize
from eacmoe.quant.packing import (
    gptq_tensor_shapes,
    pack_cols,
    pack_gptq,
    pack_rows,
    packed_length,
    unpack_cols,
    unpack_gptq,
    unpack_rows,
)

BITS = (2, 3, 4, 8)


def random_qweight(
    bits: int, in_features: int, out_features: int, group_size: int, act_order: bool = False, seed: int = 0,
    sym: bool = False,
) -> QuantizedWeight:
    """Random codes/zeros over the full range (zero point 0 included) and fp16-representable scales."""
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == -1 else in_features // group_size
    width = in_features if group_size == -1 else group_size
    g_idx = torch.arange(in_features, dtype=torch.int32) // width
    if act_order:  # act-order: columns visited in a permuted order, g_idx is no longer monotone
        g_idx = g_idx[torch.randperm(in_features, generator=g)]
    if sym:
        zeros = torch.full((out_features, n_groups), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(0, 1 << bits, (out_features, n_groups), generator=g).to(torch.uint8)
        zeros[0, 0], zeros[-1, -1] = 0, (1 << bits) - 1  # both extremes, whatever the draw
    return QuantizedWeight(
        codes=torch.randint(0, 1 << bits, (out_features, in_features), generator=g).to(torch.uint8),
        scales=(torch.rand(out_features, n_groups, generator=g) * 0.01 + 1e-4).half().float(),
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
    )


def assert_same_qweight(a: QuantizedWeight, b: QuantizedWeight) -> None:
    for field in ("codes", "scales", "zeros", "g_idx"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and torch.equal(x, y), field
    assert (a.bits, a.group_size, a.sym) == (b.bits, b.group_size, b.sym)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
def test_packed_linear_runs_exactly_the_quantized_weight(bits: int, act_order: bool) -> None:
    """The runtime's PackedLinear (the module a packed export is made of) dequantizes to exactly
    ``QuantizedWeight.dequantize`` and computes ``x W^T``, also when act-order makes g_idx a permutation."""
    from eacmoe.runtime.packed_modules import PackedLinear

    qw = random_qweight(bits, 128, 64, 32, act_order=act_order, seed=bits)
    module = PackedLinear.from_quantized(qw)
    assert torch.equal(module.dequantized_weight(), qw.dequantize())
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(module(x), x @ qw.dequantize().T, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- own layout
# (K, N, group): aligned; per-channel; K and N not multiples of 32/b (2/4/8-bit only, zero-padded words).
SHAPES = [(256, 64, 64), (128, 96, -1), (40, 20, 8), (24, 36, 12)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s[0]}-N{s[1]}-g{s[2]}")
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_round_trip(bits, shape, fmt):
    in_f, out_f, gs = shape
    if bits == 3 and (in_f % 32 or out_f % 32):
        with pytest.raises(ValueError, match="multiple of 32"):
            pack_gptq(random_qweight(bits, in_f, out_f, gs))
        return
    qw = random_qweight(bits, in_f, out_f, gs, seed=bits)
    packed = pack_gptq(qw, format=fmt)
    n_groups = 1 if gs == -1 else in_f // gs
    expected = gptq_tensor_shapes(in_f, out_f, bits, n_groups)
    assert {k: tuple(v.shape) for k, v in packed.items()} == expected
    assert expected["qweight"] == (-(-in_f * bits // 32), out_f)
    assert packed["qweight"].dtype == packed["qzeros"].dtype == packed["g_idx"].dtype == torch.int32
    assert packed["scales"].dtype == torch.float16
    assert_same_qweight(unpack_gptq(packed, bits, gs, sym=False, format=fmt), qw)


@pytest.mark.parametrize("bits", BITS)
def test_act_order_g_idx_and_sym_preserved(bits):
    qw = random_qweight(bits, 128, 64, 32, act_order=True, sym=True, seed=7)
    assert not torch.equal(qw.g_idx, qw.g_idx.sort().values)
    back = unpack_gptq(pack_gptq(qw), bits, 32, sym=True)
    assert_same_qweight(back, qw)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_round_trip_of_a_real_rtn_weight():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    qw = rtn_quantize(w, QuantSpec(bits=3, group_size=64))
    qw.scales = qw.scales.half().float()  # the convention stores fp16 scales
    assert_same_qweight(unpack_gptq(pack_gptq(qw), 3, 64, sym=False), qw)


def test_bit_layout_by_hand():
    # 4-bit: value j of a word at bit offset 4*j (little-endian nibbles).
    col = torch.arange(8, dtype=torch.int64).view(8, 1)
    assert int(pack_rows(col, 4)[0, 0]) == 0x76543210
    # 2-bit: 16 values per word; 8-bit: 4 values per word, top byte makes the int32 negative.
    assert int(pack_rows(torch.full((16, 1), 3), 2)[0, 0]) == -1
    assert int(pack_rows(torch.tensor([[1], [2], [3], [0xFF]]), 8)[0, 0]) == (0xFF030201 - (1 << 32))
    # 3-bit: value 10 straddles words 0/1 (low 2 bits at 30-31, high bit at bit 0 of word 1);
    # value 21 straddles words 1/2 (low bit at 31, high 2 bits at bits 0-1 of word 2).
    v = torch.zeros(32, 1, dtype=torch.int64)
    v[10] = 0b101
    words = pack_rows(v, 3).view(-1).tolist()
    assert words == [1 << 30, 1, 0]
    v.zero_()
    v[21] = 0b011
    assert pack_rows(v, 3).view(-1).tolist() == [0, -(1 << 31), 0b01]
    v.zero_()
    v[11], v[22] = 0b111, 0b111
    assert pack_rows(v, 3).view(-1).tolist() == [0, 0b111 << 1, 0b111 << 2]


@pytest.mark.parametrize("bits", BITS)
def test_pack_cols_is_pack_rows_transposed(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (5, 64), generator=g)
    packed = pack_cols(values, bits)
    assert packed.shape == (5, packed_length(64, bits))
    assert torch.equal(packed, pack_rows(values.T, bits).T)
    assert torch.equal(unpack_cols(packed, bits, 64), values.to(torch.int32))
    assert torch.equal(unpack_rows(pack_rows(values.T, bits), bits, 64), values.T.to(torch.int32))


def test_v1_zero_points_are_stored_minus_one():
    qw = random_qweight(4, 64, 8, 64, sym=True)  # every zero point is 8
    assert pack_gptq(qw, "gptq")["qzeros"].tolist() == [[0x77777777]]
    assert pack_gptq(qw, "gptq_v2")["qzeros"].tolist() == [[(0x88888888 - (1 << 32))]]


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        pack_rows(torch.zeros(8, 1, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_rows(torch.full((16, 1), 4), 2)
    with pytest.raises(TypeError):
        pack_rows(torch.zeros(8, 1), 4)
    with pytest.raises(ValueError, match="format"):
        pack_gptq(random_qweight(4, 64, 8, 64), format="awq")
    packed = pack_gptq(random_qweight(4, 64, 8, 32))
    with pytest.raises(ValueError, match="qweight has shape"):
        unpack_gptq({**packed, "g_idx": torch.zeros(96, dtype=torch.int32)}, 4, 32, sym=False)
    with pytest.raises(KeyError):
        unpack_gptq({"qweight": packed["qweight"]}, 4, 32, sym=False)


@pytest.mark.parametrize("group_size", [32, -1])
def test_unpack_without_g_idx_rebuilds_it(group_size):
    qw = random_qweight(4, 64, 8, group_size)
    packed = pack_gptq(qw)
    del packed["g_idx"]
    assert_same_qweight(unpack_gptq(packed, 4, group_size, sym=False), qw)


# ---------------------------------------------------------------------------------------- against GPTQModel
@pytest.fixture(scope="module")
def gptqmodel_api():
    """GPTQModel's torch QuantLinear, QuantizeConfig and its v1 <-> v2 zero-point converters (CPU)."""
    with gptqmodel_import_guard():
        pytest.importorskip("gptqmodel")
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear
        from gptqmodel.quantization.config import QuantizeConfig
        from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module, convert_gptq_v2_to_v1_format_module
    return TorchLinear, QuantizeConfig, convert_gptq_v2_to_v1_format_module, convert_gptq_v1_to_v2_format_module


def _gptqmodel_linear(api, qw: QuantizedWeight):
    TorchLinear, *_ = api
    out_f, in_f = qw.shape
    return TorchLinear(
        bits=qw.bits, group_size=qw.group_size, sym=qw.sym, desc_act=True,
        in_features=in_f, out_features=out_f, bias=False,
    )


# 3-bit needs K, N multiples of 32; the small shapes exercise GPTQModel's zero-padded ("ceil") words (N=20 at
# 2/4 bits, K=40 at 2/4 bits; GPTQModel accepts group sizes -1 and 16..1024 only).
GM_CASES = [
    pytest.param(bits, k, n, gs, act, id=f"b{bits}-K{k}-N{n}-g{gs}-{'act' if act else 'seq'}")
    for bits in BITS
    for k, n, gs, act in [(256, 64, 32, True), (128, 96, -1, False), (64, 32, 64, False)]
    + ([(48, 20, 16, True), (40, 20, -1, True)] if bits != 3 else [])
]


@pytest.mark.parametrize("bits,in_f,out_f,gs,act", GM_CASES)
def test_matches_gptqmodel_pack(gptqmodel_api, bits, in_f, out_f, gs, act):
    """GPTQModel packs the same integer weight (given as the dequantized fp32 weight plus scales/zeros/g_idx,
    which ``pack_original`` turns back into codes) and converts it to format "gptq" (v1): identical tensors."""
    _, QuantizeConfig, to_v1, _ = gptqmodel_api
    qw = random_qweight(bits, in_f, out_f, gs, act_order=act, seed=11 * bits)
    assert int(qw.zeros.min()) == 0  # exercise the v1 borrow case
    module = _gptqmodel_linear(gptqmodel_api, qw)
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    linear.weight.data = qw.dequantize()
    module.pack_original(linear, qw.scales, qw.zeros.float(), qw.g_idx)
    to_v1(module, QuantizeConfig(bits=bits, group_size=module.group_size, offload_to_disk=False))
    ours = pack_gptq(qw, format="gptq")
    for name, tensor in ours.items():
        theirs = getattr(module, name)
        assert tensor.dtype == theirs.dtype and torch.equal(tensor, theirs), name


@pytest.mark.parametrize("bits,in_f,out_f,gs,act", GM_CASES)
def test_gptqmodel_dequantizes_our_tensors(gptqmodel_api, bits, in_f, out_f, gs, act):
    """Our v1 tensors loaded into GPTQModel's module, converted v1 -> v2 by its loader and dequantized by its
    torch kernel give exactly ``fp16((code - zero) * scale)``."""
    *_, to_v2 = gptqmodel_api
    qw = random_qweight(bits, in_f, out_f, gs, act_order=act, seed=5 * bits + 1)
    module = _gptqmodel_linear(gptqmodel_api, qw)
    for name, tensor in pack_gptq(qw, format="gptq").items():
        getattr(module, name).copy_(tensor)
    to_v2(module, bits, torch.int32)
    module._init_wf_unsqueeze_buffers()  # what post_init() does, without its torch.compile step
    theirs = module.dequantize_weight().T  # [N, K] fp16
    # fp16 scale x small integer is exact in fp32, so both sides round the same product once.
    assert torch.equal(theirs, qw.dequantize().half())


def test_gptqmodel_import_does_not_leak_into_the_session(gptqmodel_api):
    assert leaked_hf_cache_vars() == []


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_tiled_dequantization_is_bit_identical_to_whole_fp32(bits: int, dtype: torch.dtype, monkeypatch) -> None:
    """Tiles of 32 input features (a partial last tile: K = 160 = 5 x 32, tile 64 -> 64, 64, 32) computed in fp32
    and cast give exactly ``QuantizedWeight.dequantize().to(dtype)`` (the whole fp32 matrix, then the cast), also
    with an act-order g_idx; PackedExperts, dequantizing into the halves of one gate_up matrix, gives exactly the
    eager loop over those weights."""
    from eacmoe.runtime import packed_modules
    from eacmoe.runtime.packed_modules import PackedExperts, PackedLinear

    qw = random_qweight(bits, 160, 64, 32, act_order=True, seed=bits)
    module = PackedLinear.from_quantized(qw)
    monkeypatch.setattr(packed_modules, "TILE_BYTES", 64 * 4 * 64)
    assert module.tile_rows() == 64
    assert torch.equal(module.dequantized_weight(dtype), qw.dequantize().to(dtype))

    hidden, inter, experts = 64, 96, 3
    qws = {e: {"gate_proj": random_qweight(bits, hidden, inter, 32, seed=10 * e + 1),
               "up_proj": random_qweight(bits, hidden, inter, 32, seed=10 * e + 2),
               "down_proj": random_qweight(bits, inter, hidden, 32, seed=10 * e + 3)} for e in range(experts)}
    act = torch.nn.SiLU()
    packed = PackedExperts.from_quantized(qws, act)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, hidden, generator=g).to(dtype)
    index = torch.tensor([[0, 2], [1, 0], [2, 3], [0, 1], [2, 1], [3, 3], [1, 2]])  # 3 = a dropped slot
    weights = torch.rand(7, 2, generator=g).to(dtype)
    expected = torch.zeros_like(x)
    for e in range(experts):  # the old path: whole fp32 dequantization, cast, concatenated gate and up
        slot, token = torch.where(index.T == e)
        w = {p: qws[e][p].dequantize().to(dtype) for p in qws[e]}
        gate, up = torch.nn.functional.linear(x[token], torch.cat([w["gate_proj"], w["up_proj"]])).chunk(2, dim=-1)
        y = torch.nn.functional.linear(act(gate) * up, w["down_proj"])
        expected.index_add_(0, token, y * weights[token, slot, None])
    assert torch.equal(packed(x, index, weights), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", BITS)
def test_packed_linear_on_cuda_dequantizes_exactly_as_on_cpu(bits: int) -> None:
    """The tiled dequantization is elementwise fp32 arithmetic: bit-identical on the GPU (bf16 and fp16)."""
    from eacmoe.runtime.packed_modules import PackedLinear

    module = PackedLinear.from_quantized(random_qweight(bits, 256, 128, 64, act_order=True, seed=bits))
    on_gpu = PackedLinear.from_quantized(random_qweight(bits, 256, 128, 64, act_order=True, seed=bits)).cuda()
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(on_gpu.dequantized_weight(dtype).cpu(), module.dequantized_weight(dtype))
