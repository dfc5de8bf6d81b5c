"""Quantization grid, QuantSpec validation and the RTN baseline."""

import pytest
import torch

from eacmoe.quant import QuantizedWeight, QuantSpec, dequantize_codes, fit_grid, quantize_to_codes, rtn_quantize

BITS = (2, 3, 4, 8)


def _weight(rows: int = 8, cols: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02


def _manual_dequant(qw: QuantizedWeight) -> torch.Tensor:
    # Column by column, straight from the definition, to check QuantizedWeight.dequantize.
    out = torch.empty(qw.codes.shape, dtype=torch.float32)
    for c in range(qw.codes.shape[1]):
        g = int(qw.g_idx[c])
        out[:, c] = (qw.codes[:, c].float() - qw.zeros[:, g].float()) * qw.scales[:, g]
    return out


# ---------------------------------------------------------------- QuantSpec validation


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 16, True])
def test_spec_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("group_size", [0, -2, -128])
def test_spec_rejects_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(bits=4, group_size=group_size)


def test_spec_rejects_bad_damp_and_block():
    with pytest.raises(ValueError, match="damp_percent"):
        QuantSpec(bits=4, damp_percent=0.0)
    with pytest.raises(ValueError, match="damp_percent"):
        QuantSpec(bits=4, damp_percent=float("nan"))
    with pytest.raises(ValueError, match="block_size"):
        QuantSpec(bits=4, block_size=0)


def test_spec_is_frozen_and_defaults():
    spec = QuantSpec(bits=3)
    defaults = (spec.group_size, spec.sym, spec.act_order, spec.damp_percent, spec.block_size)
    assert defaults == (128, False, False, 0.01, 128)
    assert spec.maxq == 7
    with pytest.raises(Exception):
        spec.bits = 4  # type: ignore[misc]


def test_group_size_must_divide_input_dimension():
    spec = QuantSpec(bits=4, group_size=32)
    assert spec.n_groups(96) == 3
    with pytest.raises(ValueError, match=r"in_features=100"):
        spec.n_groups(100)
    with pytest.raises(ValueError, match=r"does not divide the input dimension in_features=100"):
        rtn_quantize(torch.zeros(4, 100), spec)
    # group larger than the layer does not divide it either
    with pytest.raises(ValueError, match=r"in_features=16"):
        rtn_quantize(torch.zeros(4, 16), spec)


def test_per_channel_group_size():
    spec = QuantSpec(bits=4, group_size=-1)
    assert spec.effective_group_size(100) == 100 and spec.n_groups(100) == 1
    w = _weight(cols=100)
    qw = rtn_quantize(w, spec)
    assert qw.scales.shape == (8, 1) and qw.zeros.shape == (8, 1)
    assert torch.equal(qw.g_idx, torch.zeros(100, dtype=torch.int32))
    # one group spanning the row == an explicit group of the full width
    qw_full = rtn_quantize(w, QuantSpec(bits=4, group_size=100))
    assert torch.equal(qw.codes, qw_full.codes) and torch.equal(qw.scales, qw_full.scales)


# ---------------------------------------------------------------- grids


def test_fit_grid_hand_example():
    # asym 2-bit over [-1, 0, 3]: range [-1, 3], scale 4/3, zero round(0.75) = 1
    w = torch.tensor([[-1.0, 0.0, 3.0]])
    scale, zero = fit_grid(w, bits=2, sym=False, scale_dtype="float32")
    assert torch.allclose(scale, torch.tensor([4.0 / 3.0]))
    assert zero.tolist() == [1.0]
    codes = quantize_to_codes(w, scale[:, None], zero[:, None], bits=2)
    assert codes.tolist() == [[0.0, 1.0, 3.0]]
    deq = dequantize_codes(codes, scale[:, None], zero[:, None])
    assert torch.allclose(deq, torch.tensor([[-4.0 / 3.0, 0.0, 8.0 / 3.0]]))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_codes_in_range_and_dequantize_exactly(bits, sym):
    w = _weight()
    spec = QuantSpec(bits=bits, group_size=16, sym=sym, scale_dtype="float32")
    qw = rtn_quantize(w, spec)
    maxq = 2**bits - 1
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == w.shape
    assert qw.scales.dtype == torch.float32 and qw.scales.shape == (8, 4)
    assert qw.zeros.shape == (8, 4) and qw.g_idx.dtype == torch.int32
    assert int(qw.codes.max()) <= maxq
    assert int(qw.zeros.max()) <= maxq
    assert torch.equal(qw.g_idx, torch.arange(64, dtype=torch.int32) // 16)
    deq = qw.dequantize()
    assert deq.dtype == torch.float32
    # exactly (bit for bit) the codes * scale form
    assert torch.equal(deq, _manual_dequant(qw))
    # min/max grids cover every value, so the rounding error is at most half a step
    step = qw.scales[:, qw.g_idx.long()]
    assert bool(((deq - w).abs() <= step / 2 * (1 + 1e-4) + 1e-7).all())  # fp32 slack
    if sym:
        assert bool((qw.zeros == 2 ** (bits - 1)).all())
        m = w.reshape(8, 4, 16).abs().amax(-1)
        assert torch.allclose(qw.scales, 2 * m / maxq)


@pytest.mark.parametrize("bits", BITS)
def test_asym_grid_spans_min_and_max(bits):
    w = _weight(seed=1)
    qw = rtn_quantize(w, QuantSpec(bits=bits, group_size=32, scale_dtype="float32"))
    wg = w.reshape(8, 2, 32)
    lo = torch.clamp(wg.amin(-1), max=0)
    hi = torch.clamp(wg.amax(-1), min=0)
    assert torch.allclose(qw.scales, (hi - lo) / (2**bits - 1))
    # the zero point is the integer code of 0.0: exact zeros stay exactly zero
    w2 = w.clone()
    w2[:, ::5] = 0.0
    deq = rtn_quantize(w2, QuantSpec(bits=bits, group_size=32)).dequantize()
    assert bool((deq[:, ::5] == 0).all())


def test_asym_grid_of_a_one_signed_group_reaches_zero():
    # all-positive / all-negative groups: the range is [0, max] / [min, 0], so 0 is a grid point (code = zero)
    w = torch.tensor([[0.5, 1.0, 2.0, 3.0], [-3.0, -2.0, -1.0, -0.5]])
    scale, zero = fit_grid(w, bits=2, sym=False, scale_dtype="float32")
    assert scale.tolist() == [1.0, 1.0] and zero.tolist() == [0.0, 3.0]


def test_sym_grid_on_nonnegative_group_is_not_clipped():
    # GPTQ's own find_params would use range [0, max] with a mid zero point here and clip the top half.
    w = torch.rand(4, 16) + 0.1
    for scale_dtype in ("float32", "float16"):
        qw = rtn_quantize(w, QuantSpec(bits=4, group_size=16, sym=True, scale_dtype=scale_dtype))
        deq = qw.dequantize()
        assert bool(((deq - w).abs() <= qw.scales / 2 * (1 + 1e-4) + 1e-7).all())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [False, True])
def test_fp16_scales_are_exact_rounded_up_and_never_clip(bits, sym):
    w = _weight(rows=64, cols=128, seed=3) * torch.logspace(-4, 1, 64).unsqueeze(1)  # many magnitudes
    exact = rtn_quantize(w, QuantSpec(bits=bits, group_size=32, sym=sym, scale_dtype="float32"))
    qw = rtn_quantize(w, QuantSpec(bits=bits, group_size=32, sym=sym))  # default: fp16 scales
    assert torch.equal(qw.scales, qw.scales.half().float())  # what the checkpoint stores, exactly
    assert bool((qw.scales >= exact.scales).all())
    # one fp16 step up at most: relative 2**-10 in fp16's normal range, absolute 2**-24 below it (subnormals)
    assert bool((qw.scales <= torch.maximum(exact.scales * (1 + 2.0**-10), exact.scales + 2.0**-24)).all())
    deq = qw.dequantize()
    step = qw.scales[:, qw.g_idx.long()]
    assert bool(((deq - w).abs() <= step / 2 * (1 + 1e-4) + 1e-7).all())  # the grid still spans every group


def test_round_up_to_fp16_edge_cases():
    from eacmoe.quant.grid import round_up_to_fp16

    values = torch.tensor([1.0, 1.0 + 2.0**-12, 3e-9, 6.1e-5, 1000.3])
    rounded = round_up_to_fp16(values)
    assert rounded[0] == 1.0 and rounded[1] == 1.0 + 2.0**-10  # exact stays, anything above goes up
    assert rounded[2] == 2.0**-24  # below the smallest fp16: the floor, never 0
    assert bool((rounded >= values).all()) and torch.equal(rounded, rounded.half().float())


def test_all_zero_group_and_8bit_codes():
    w = _weight(cols=32)
    w[:, :16] = 0.0
    qw = rtn_quantize(w, QuantSpec(bits=8, group_size=16))
    assert bool((qw.dequantize()[:, :16] == 0).all())
    assert bool(torch.isfinite(qw.scales).all()) and bool((qw.scales > 0).all())
    assert int(qw.codes.max()) <= 255 and int(qw.codes.max()) > 200  # uint8 holds 8-bit codes


def test_rtn_does_not_mutate_and_accepts_bf16():
    w = _weight()
    before = w.clone()
    rtn_quantize(w, QuantSpec(bits=2, group_size=16))
    assert torch.equal(w, before)
    qw = rtn_quantize(w.to(torch.bfloat16), QuantSpec(bits=4, group_size=16))
    assert qw.dequantize().dtype == torch.float32


def test_quantized_weight_validates_shapes():
    qw = rtn_quantize(_weight(), QuantSpec(bits=4, group_size=16))
    with pytest.raises(ValueError, match="g_idx"):
        QuantizedWeight(qw.codes, qw.scales, qw.zeros, qw.g_idx[:-1], 4, 16, False)
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight(qw.codes, qw.scales[:, :2], qw.zeros, qw.g_idx, 4, 16, False)
    assert qw.n_groups == 4 and tuple(qw.shape) == (8, 64)
