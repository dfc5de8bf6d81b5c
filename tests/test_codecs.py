"""Error-bounded codecs, the bits-target search, the noise model and the bits accounting (eacmoe.codecs).

Codec checks run on real expert matrices of the bundled tiny-mixtral; every expectation is computed here
independently (float64 errors, mean |w|, byte counts of the serialised stream or of the safetensors file, closed-form
entropies).
"""
from __future__ import annotations

import math
import struct
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eacmoe import codecs as C
from eacmoe.assets import bundled_model_path
from eacmoe.quant.grid import QuantizedWeight, QuantSpec, rtn_quantize
from eacmoe.runtime.packed_modules import PackedLinear
from eacmoe.schedule import BitsAccount

pytest.importorskip("pysz")
pytest.importorskip("zfpy")

EXPERT = "model.layers.{layer}.block_sparse_moe.experts.{e}.w{j}.weight"


@pytest.fixture(scope="module")
def weights():
    with safe_open(str(bundled_model_path("tiny-mixtral") / "model.safetensors"), "pt") as f:
        return {(layer, e, j): f.get_tensor(EXPERT.format(layer=layer, e=e, j=j)).float()
                for layer in (0, 3, 7) for e in range(8) for j in (1, 2, 3)}


def _few(weights):
    """Six real matrices: gate/down of the first, a middle and the last layer."""
    return [weights[(layer, e, j)] for layer, e in ((0, 0), (3, 5), (7, 2)) for j in (1, 2)]


def _max_err(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


# ---------------------------------------------------------------------------------------------------------------
# codecs


@pytest.mark.parametrize("codec", list(C.CODECS))
def test_every_codec_respects_its_absolute_bound_on_real_weights(weights, codec):
    for w in _few(weights):
        mean_abs = float(w.double().abs().mean())
        cases = [(f"abs:{b:g}", b) for b in (1e-4, 1e-3, 1e-2)]
        cases += [(f"rel:{p:g}", p * mean_abs) for p in C.NOISE_LEVELS]
        for text, expected_bound in cases:
            restored, stats = C.compress_matrix(w, codec, text)
            assert restored.dtype == w.dtype and restored.shape == w.shape
            assert stats.abs_bound == pytest.approx(expected_bound, rel=1e-12), text
            err = _max_err(restored, w)
            assert 0 < err <= expected_bound, (codec, text, err)
            assert stats.max_abs_error == err
            # a real codec, not a copy: the stream is smaller than float32 and the header is counted
            assert 0 < stats.bits_per_weight < 32


@pytest.mark.parametrize("codec", list(C.CODECS))
def test_bits_are_the_real_serialised_bytes_and_decode_from_them_alone(weights, codec):
    w = weights[(3, 1, 1)].numpy()
    compressed = C.get_codec(codec).compress(w, C.parse_bound("rel:0.3"))
    data = compressed.to_bytes()
    assert compressed.bits.bits_per_weight == len(data) * 8 / w.size
    assert compressed.bits.header_bits == 8 * C.HEADER.size
    back = C.Compressed.from_bytes(data)
    assert back == compressed
    as_bf16 = C.get_codec(codec).compress(w, 1e-3, dtype="bfloat16")
    assert C.Compressed.from_bytes(as_bf16.to_bytes()) == as_bf16 and as_bf16.abs_bound == 1e-3
    decoded = C.get_codec(codec).decompress(data)
    assert decoded.dtype == np.float32 and _max_err(decoded, w) <= compressed.abs_bound
    with pytest.raises(ValueError, match="compressed with"):
        C.get_codec("zfp" if codec == "sz3" else "sz3").decompress(data)


def test_a_missing_codec_package_fails_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pysz", None)  # makes `import pysz` raise ImportError
    with pytest.raises(ImportError) as info:
        C.get_codec("sz3").compress(np.ones((4, 4), np.float32), 1e-3)
    assert str(info.value) == "the SZ3 codec needs the 'pysz' package: pip install 'eacmoe[codecs]'"


def test_bf16_weights_come_back_in_bf16_within_bound_plus_half_an_ulp(weights):
    w = weights[(0, 3, 2)].to(torch.bfloat16)
    bound = 1e-3
    restored, stats = C.compress_matrix(w, "sz3", C.ErrorBound("abs", bound))
    assert restored.dtype == torch.bfloat16
    assert stats.codec_max_abs_error <= bound
    # bf16 keeps 8 significant bits: rounding the decode adds at most half an ulp of the value
    half_ulp = 2.0 ** (torch.floor(torch.log2(w.float().abs().max() + bound)) - 8)
    err = _max_err(restored, w)
    assert err == stats.max_abs_error <= bound + float(half_ulp)


# ---------------------------------------------------------------------------------------------------------------
# error bounds and the bits-target search


def test_parse_bound_reads_the_three_kinds_and_rejects_bad_strings_in_one_line():
    assert C.parse_bound("abs:1e-3") == C.ErrorBound("abs", 1e-3)
    assert C.parse_bound(" REL : 0.3 ") == C.ErrorBound("rel", 0.3)
    assert C.parse_bound("bpw:2.5") == C.ErrorBound("bpw", 2.5)
    assert str(C.parse_bound("rel:0.30")) == "rel:0.3"
    for bad in ("", "rel", "rel:", "0.3", "rel:abc", "rel:-1", "abs:0", "bpw:inf", "bpw:nan", "l2:1", "rel:1:2"):
        with pytest.raises(ValueError) as info:
            C.parse_bound(bad)
        assert "\n" not in str(info.value) and repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="unknown codec 'sz4': expected one of sz3, zfp"):
        C.get_codec("sz4")


def _bits_at(codec: C.Codec, mats, abs_bounds) -> float:
    """Bits per weight counted here from the serialised streams."""
    return sum(len(codec.compress(m, b).to_bytes()) for m, b in zip(mats, abs_bounds)) * 8 / sum(
        m.size for m in mats)


@pytest.mark.parametrize("target", [2.0, 2.5, 3.0, 4.0])
def test_sz3_bits_search_lands_within_2_percent_on_one_matrix(weights, target):
    w = weights[(7, 4, 3)].numpy()
    codec = C.get_codec("sz3")
    result = C.search_bound(codec, w, target)
    bpw = _bits_at(codec, [w], result.abs_bounds)
    assert abs(bpw - target) <= 0.02 * target
    assert result.bits_per_weight == bpw
    assert result.abs_bounds[0] == pytest.approx(result.bound.value * float(np.abs(w.astype(np.float64)).mean()))
    # the bpw bound of compress_matrix runs the same search
    _, stats = C.compress_matrix(weights[(7, 4, 3)], codec, f"bpw:{target}")
    assert abs(stats.bits_per_weight - target) <= 0.02 * target


@pytest.mark.parametrize("target", [2.0, 2.5, 3.0, 4.0])
def test_zfp_bits_search_lands_within_2_percent_over_a_layers_experts(weights, target):
    # ZFP's size moves in one-bit steps per matrix; over the 24 matrices of a layer the steps interleave
    mats = [weights[(3, e, j)].numpy() for e in range(8) for j in (1, 2, 3)]
    codec = C.get_codec("zfp")
    result = C.search_bound(codec, mats, target)
    assert abs(_bits_at(codec, mats, result.abs_bounds) - target) <= 0.02 * target
    means = [float(np.abs(m.astype(np.float64)).mean()) for m in mats]
    assert result.abs_bounds == pytest.approx([result.bound.value * m for m in means])


def test_unreachable_bits_targets_raise_one_line(weights):
    w = weights[(0, 1, 1)].numpy()
    sz3, zfp = C.get_codec("sz3"), C.get_codec("zfp")
    for codec, target, says in ((sz3, 0.005, "cannot go down to 0.005"), (sz3, 40, "cannot reach 40"),
                                (zfp, 3.0, "cannot land within 2% of 3")):
        with pytest.raises(ValueError, match=says) as info:
            C.search_bound(codec, w, target)
        assert "\n" not in str(info.value)
    # a step of ZFP's size skips 3 bits: the nearest size seen lies outside the window, on a real step
    nearest_bpw, nearest_scale = info.value.nearest
    assert abs(nearest_bpw - 3.0) > 0.06
    assert nearest_bpw == _bits_at(zfp, [w], [nearest_scale * float(np.abs(w.astype(np.float64)).mean())])


# ---------------------------------------------------------------------------------------------------------------
# the study's noise model and SZ3's real error


def test_gaussian_noise_has_mean_zero_and_std_p_times_mean_abs_w(weights):
    w = torch.cat([weights[(3, e, j)] for e in range(8) for j in (1, 2, 3)])  # [6144, 256]: 1.6M weights
    n = w.numel()
    mean_abs = float(w.double().abs().mean())
    for p in C.NOISE_LEVELS:
        noisy = C.gaussian_noise(w, p, torch.Generator().manual_seed(int(100 * p)))
        noise = (noisy.double() - w.double()).flatten()
        sigma = p * mean_abs
        assert abs(float(noise.mean())) < 5 * sigma / math.sqrt(n)
        # the sample std of n normal draws has relative spread 1/sqrt(2n)
        assert float(noise.std()) == pytest.approx(sigma, rel=5 / math.sqrt(2 * n))
        # Normal, not uniform: about 68.3% of the draws within one sigma
        assert float((noise.abs() < sigma).double().mean()) == pytest.approx(0.6827, abs=0.003)
    again = C.gaussian_noise(w, 0.3, torch.Generator().manual_seed(30))
    assert torch.equal(again, C.gaussian_noise(w, 0.3, torch.Generator().manual_seed(30)))
    assert again.dtype == w.dtype and not torch.equal(again, w)


def test_sz3_error_histogram_is_uniform_within_the_bound_unlike_the_normal_model(weights, tmp_path):
    w = torch.cat([weights[(7, e, 1)] for e in range(8)])
    hist = C.error_histogram(w, "rel:0.3", "sz3", bins=61)
    bound = 0.3 * float(w.double().abs().mean())
    assert hist.abs_bound == pytest.approx(bound)
    widths = np.diff(hist.edges)
    assert float((hist.real_density * widths).sum()) == pytest.approx(1.0)
    assert hist.real_max_abs <= bound
    # SZ3's linear quantizer leaves an error uniform on [-bound, bound]: std bound/sqrt(3), no mass beyond it
    assert hist.real_std == pytest.approx(bound / math.sqrt(3), rel=0.05)
    centers = (hist.edges[:-1] + hist.edges[1:]) / 2
    assert float(hist.real_density[np.abs(centers) > bound * 1.05].sum()) == 0
    # the Normal references: exact bin masses of N(0, bound) and N(0, real std)
    for density, std in ((hist.normal_at_bound_density, bound), (hist.normal_matched_std_density, hist.real_std)):
        inside = math.erf(hist.edges[-1] / (std * math.sqrt(2)))
        assert float((density * widths).sum()) == pytest.approx(inside, rel=1e-9)
        assert float(density[len(density) // 2]) == pytest.approx(1 / (std * math.sqrt(2 * math.pi)), rel=0.01)
    png = C.plot_error_histogram(hist, tmp_path / "hist.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# throughput


class SleepCodec(C.Codec):
    """A codec whose cost is known: every call sleeps for the next duration of its schedule (cycled)."""

    name = "sleep"

    def __init__(self, compress_sleeps=(0.04,), decompress_sleeps=(0.02,)):
        self.compress_sleeps, self.decompress_sleeps = compress_sleeps, decompress_sleeps
        self.calls = {"compress": 0, "decompress": 0}

    def _sleep(self, kind, schedule):
        time.sleep(schedule[self.calls[kind] % len(schedule)])
        self.calls[kind] += 1

    def _encode(self, w, abs_bound):
        self._sleep("compress", self.compress_sleeps)
        return b"x" * 100

    def _decode(self, payload, shape):
        self._sleep("decompress", self.decompress_sleeps)
        return np.zeros(shape, np.float32)


@pytest.mark.parametrize("threads", [1, 2])
def test_throughput_counts_float32_megabytes_over_the_slowest_worker(threads):
    mats = [np.ones((256, 256), np.float32)] * 2
    # fork: a spawned worker would import this module (torch) just to unpickle SleepCodec
    result = C.measure_throughput(SleepCodec(), mats, 1e-3, threads=threads, repeats=3, start_method="fork")
    megabytes = 2 * 256 * 256 * 4 / 1e6
    assert result.compress_mb_s == pytest.approx(megabytes / result.compress_s, rel=1e-12)
    assert result.decompress_mb_s == pytest.approx(megabytes / result.decompress_s, rel=1e-12)
    # one worker compresses both matrices in turn (80 ms); two workers one each, at the same time (40 ms)
    per_round = 0.08 / threads
    assert per_round <= result.compress_s < 1.3 * per_round
    assert per_round / 2 <= result.decompress_s < 1.3 * per_round / 2
    assert result.bits_per_weight == 2 * (100 + C.HEADER.size) * 8 / (2 * 256 * 256)
    assert result.threads == threads and result.numel == 2 * 256 * 256


def test_throughput_takes_the_median_round():
    # calls: warm-up, then three rounds of 10, 200 and 50 ms: median 50 ms (mean 87, min 10)
    codec = SleepCodec(compress_sleeps=(0.0, 0.01, 0.2, 0.05), decompress_sleeps=(0.0, 0.2, 0.01, 0.05))
    result = C.measure_throughput(codec, np.ones((64, 64), np.float32), "abs:1e-3", repeats=3)
    assert 0.05 <= result.compress_s < 0.065 and 0.05 <= result.decompress_s < 0.065


# ---------------------------------------------------------------------------------------------------------------
# quantized weights: bits moved per weight


def _disk_bytes_of_tensor_data(path) -> int:
    """File size minus safetensors' header (8-byte length + JSON): the bytes of the tensors themselves."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header_len


@pytest.mark.parametrize("bits,group_size,out_features", [(2, 128, 256), (3, 128, 256), (4, -1, 256),
                                                          (8, 64, 256), (2, 128, 100), (4, 32, 36)])
def test_packed_bits_equal_the_bytes_on_disk(weights, tmp_path, bits, group_size, out_features):
    w = weights[(3, 2, 1)][:out_features]
    qw = rtn_quantize(w, QuantSpec(bits=bits, group_size=group_size))
    path = tmp_path / "m.safetensors"
    save_file(PackedLinear.from_quantized(qw).state_dict(), str(path))  # the tensors the packed export writes
    account = C.packed_bits(qw)
    assert account.total_bytes == _disk_bytes_of_tensor_data(path)
    n, k = qw.shape
    g = 1 if group_size == -1 else k // group_size
    assert account.payload_bits == 32 * math.ceil(k * bits / 32) * n
    assert account.scale_bits == 16 * g * n
    assert account.zero_bits == 32 * g * math.ceil(n * bits / 32)
    assert account.index_bits == 32 * k
    if (n * bits) % 32 == 0:  # no word padding: the same as BitsAccount plus the g_idx it leaves out
        reference = BitsAccount()
        reference.add_quantized(n, k, bits, group_size)
        assert account.total_bits - account.index_bits == reference.quantized_bits + reference.overhead_bits


def _qw_with_codes(codes: torch.Tensor, bits: int) -> QuantizedWeight:
    out_f, in_f = codes.shape
    return QuantizedWeight(codes=codes.to(torch.uint8), scales=torch.full((out_f, 1), 0.01),
                           zeros=torch.full((out_f, 1), 1, dtype=torch.uint8),
                           g_idx=torch.zeros(in_f, dtype=torch.int32), bits=bits, group_size=-1, sym=False)


def test_entropy_of_a_known_code_histogram_is_the_closed_form():
    assert C.shannon_entropy([1, 1, 2]) == pytest.approx(1.5)
    assert C.shannon_entropy([5, 0, 0]) == 0.0
    # 2-bit codes with frequencies 1/2, 1/4, 1/8, 1/8: H = 1/2*1 + 1/4*2 + 2 * 1/8*3 = 1.75 bits
    pattern = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])
    codes = pattern.repeat(64, 16)[:, torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    qw = _qw_with_codes(codes, bits=2)
    assert C.code_entropy_bits(qw) == pytest.approx(1.75, abs=1e-12)
    account = C.entropy_bits(qw)
    packed = C.packed_bits(qw)
    assert account.payload_bits == pytest.approx(1.75 * codes.numel())
    assert account.header_bits == 4 * 32
    assert (account.scale_bits, account.zero_bits, account.index_bits) == (
        packed.scale_bits, packed.zero_bits, packed.index_bits)
    uniform = _qw_with_codes(torch.arange(16).repeat(32, 4), bits=4)
    assert C.code_entropy_bits(uniform) == pytest.approx(4.0)


def test_zstd_bits_are_real_compressed_frames(weights):
    pytest.importorskip("zstandard")
    random_codes = torch.randint(0, 16, (128, 256), generator=torch.Generator().manual_seed(0))
    incompressible = C.zstd_bits(_qw_with_codes(random_codes, bits=4))
    assert 4.0 <= incompressible.payload_bits / random_codes.numel() < 4.05  # random bits stay (frame adds a bit)
    constant = C.zstd_bits(_qw_with_codes(torch.full((128, 256), 5), bits=4))
    assert constant.payload_bits / constant.numel < 0.05
    # a real 2-bit expert: its skewed histogram codes below 2 bits, and zstd beats the packed size
    qw = rtn_quantize(weights[(3, 2, 1)], QuantSpec(bits=2, group_size=128))
    moved = C.quantized_bits_moved(qw)
    assert C.code_entropy_bits(qw) < 1.9
    assert moved["zstd"].bits_per_weight < moved["entropy"].bits_per_weight < moved["packed"].bits_per_weight
