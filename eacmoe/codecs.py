"""Error-bounded lossy compression of expert weight matrices, and the accounting of bits moved per weight.

Experts that are offloaded to host memory cross PCIe every time they are needed; this module measures what moving
them costs under two families of methods, with one accounting for both (:class:`WeightBits`):

- **Error-bounded codecs** (SZ3 through ``pysz``, ZFP through ``zfpy``) applied per weight matrix. Every weight's
  error is at most the bound; the bound is absolute (``abs:1e-3``), relative to the matrix's mean |w| (``rel:0.3``
  = 30% of mean |w|, the parameterisation of the sensitivity study arXiv 2509.07727), or searched to hit a bits
  target (``bpw:2.5``). Bits are the real compressed bytes, the codec's own stream plus this module's container
  header (:data:`HEADER`), i.e. everything a decoder needs to rebuild the matrix.
- **Quantized codes** (:class:`~eacmoe.quant.grid.QuantizedWeight`) as the packed export stores them, and what a
  lossless coder gives on top of them (order-0 entropy of the codes; real zstd frames).

The study's *simulated* compression (Normal noise of standard deviation p x mean|w|, :func:`gaussian_noise`) and
a histogram of SZ3's real error against that model (:func:`error_histogram`) are here too.

``pysz``, ``zfpy`` and ``zstandard`` (the ``codecs`` extra) are imported only by the functions that need them, and
torch only by the functions that take tensors: the worker processes of :func:`measure_throughput` import this
module and should start fast.
"""
from __future__ import annotations

import importlib
import logging
import math
import multiprocessing
import numbers
import os
import queue
import re
import statistics
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

    from .quant.grid import QuantizedWeight

__all__ = [
    "BOUND_KINDS",
    "CODECS",
    "HEADER",
    "NOISE_LEVELS",
    "BoundSearch",
    "Codec",
    "Compressed",
    "CompressionStats",
    "ErrorBound",
    "ErrorHistogram",
    "SZ3Codec",
    "Throughput",
    "UnreachableBits",
    "WeightBits",
    "ZFPCodec",
    "available_cpus",
    "code_entropy_bits",
    "compress_matrix",
    "entropy_bits",
    "error_histogram",
    "gaussian_noise",
    "get_codec",
    "mean_abs",
    "measure_throughput",
    "packed_bits",
    "parse_bound",
    "plot_error_histogram",
    "quantized_bits_moved",
    "search_bound",
    "shannon_entropy",
    "zstd_bits",
]

logger = logging.getLogger(__name__)


def _require(module: str, what: str) -> Any:
    """Import an optional dependency, or fail with one line that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs the '{module}' package: pip install 'eacmoe[codecs]'") from None


# --------------------------------------------------------------------------------------------------------------
# Bits accounting (one for codecs and quantized weights)


@dataclass(frozen=True)
class WeightBits:
    """The bits one weight matrix takes on disk or on the wire, by part.

    Attributes:
        numel: weights in the matrix.
        payload_bits: the weights themselves: a codec's compressed stream, the packed codes (``qweight``), or the
            codes after lossless coding.
        scale_bits: per-group scales (fp16 ``scales`` in the packed export); 0 for codecs.
        zero_bits: per-group zero points (``qzeros``, packed into int32 words); 0 for codecs.
        index_bits: the group index of every input column (``g_idx``, int32); 0 for codecs.
        header_bits: what the decoder needs besides the tensors above: this module's container header for a
            codec (:data:`HEADER`: codec, dtype, shape, bound), the symbol frequency table of an entropy coder.
            The packed export keeps shapes and bit widths in its safetensors header and config, shared by all
            tensors of a file; they are not counted (about 4 x 100 bytes of JSON per matrix).

    ``bits_per_weight`` = total bits / numel: "bits moved per weight". Fractional bits (an entropy estimate) are
    allowed.
    """

    numel: int
    payload_bits: float
    scale_bits: float = 0.0
    zero_bits: float = 0.0
    index_bits: float = 0.0
    header_bits: float = 0.0

    @property
    def total_bits(self) -> float:
        return self.payload_bits + self.scale_bits + self.zero_bits + self.index_bits + self.header_bits

    @property
    def total_bytes(self) -> float:
        return self.total_bits / 8

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / max(1, self.numel)

    def __add__(self, other: "WeightBits") -> "WeightBits":
        """Sum over matrices (a layer, a model): bits per weight of the sum is the weighted average."""
        return WeightBits(self.numel + other.numel, self.payload_bits + other.payload_bits,
                          self.scale_bits + other.scale_bits, self.zero_bits + other.zero_bits,
                          self.index_bits + other.index_bits, self.header_bits + other.header_bits)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total_bits": self.total_bits, "bits_per_weight": self.bits_per_weight}


# --------------------------------------------------------------------------------------------------------------
# Error bounds

BOUND_KINDS = ("abs", "rel", "bpw")
_BOUND_SYNTAX = "abs:<bound>, rel:<fraction of mean |w|> or bpw:<bits per weight>, e.g. rel:0.3"


@dataclass(frozen=True)
class ErrorBound:
    """How the error bound of one matrix is chosen.

    - ``abs``: every weight's error is at most ``value``.
    - ``rel``: at most ``value`` x mean|w| of that matrix (``rel:0.3`` = 30% of mean |w|, the study's p).
    - ``bpw``: the bound whose real compressed size is ``value`` bits per weight (within 2%), found by
      :func:`search_bound`.
    """

    kind: Literal["abs", "rel", "bpw"]
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BOUND_KINDS:
            raise ValueError(f"error bound kind must be one of {', '.join(BOUND_KINDS)}, got {self.kind!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, numbers.Real) or not (
                0 < float(self.value) < math.inf):
            raise ValueError(f"error bound {self.kind}:{self.value!r} must be a positive finite number")

    def absolute(self, w: np.ndarray) -> float:
        """The absolute tolerance for matrix ``w`` (``abs`` and ``rel`` only; ``bpw`` needs a codec: search)."""
        if self.kind == "abs":
            return float(self.value)
        if self.kind == "rel":
            # An all-zero matrix is reproduced exactly by any bound; the codecs need a positive one.
            return max(float(self.value) * mean_abs(w), float(np.finfo(np.float32).tiny))
        raise ValueError(f"a {self} bound depends on the codec: use search_bound or compress_matrix")

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


def parse_bound(text: str) -> ErrorBound:
    """``"abs:1e-3"``, ``"rel:0.3"``, ``"bpw:2.5"`` -> :class:`ErrorBound`; anything else -> one-line ValueError."""
    match = re.fullmatch(r"\s*(\w+)\s*:\s*(\S+)\s*", str(text))
    if not match or match.group(1).lower() not in BOUND_KINDS:
        raise ValueError(f"bad error bound {text!r}: expected {_BOUND_SYNTAX}")
    try:
        value = float(match.group(2))
    except ValueError:
        raise ValueError(f"bad error bound {text!r}: {match.group(2)!r} is not a number") from None
    if not 0 < value < math.inf:
        raise ValueError(f"bad error bound {text!r}: the value must be positive and finite")
    return ErrorBound(match.group(1).lower(), value)  # type: ignore[arg-type]


def mean_abs(w: np.ndarray) -> float:
    """mean |w| in float64 (the reference scale of ``rel`` bounds and of the noise model)."""
    return float(np.abs(np.asarray(w, dtype=np.float64)).mean()) if np.size(w) else 0.0


# --------------------------------------------------------------------------------------------------------------
# Codecs

# Container header of one compressed matrix: codec name (8 bytes, ASCII), original dtype code, rows, columns and
# the absolute bound the codec was run with. The codecs' own streams carry their settings too; this is what our
# decoder reads to pick the codec and rebuild the tensor, so it is counted in every bits-per-weight figure.
HEADER = struct.Struct("<8sBIId")
_DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}
_DTYPE_NAMES = {code: name for name, code in _DTYPE_CODES.items()}


@dataclass(frozen=True)
class Compressed:
    """One compressed matrix: ``to_bytes()`` is all a decoder needs, ``nbytes`` is its exact length."""

    codec: str
    shape: tuple[int, int]
    abs_bound: float
    payload: bytes
    dtype: str = "float32"  # dtype of the original tensor; the decoded matrix is float32, cast back by the caller

    def to_bytes(self) -> bytes:
        if len(self.codec.encode("ascii")) > 8:
            raise ValueError(f"codec name {self.codec!r} does not fit the 8-byte header field")
        rows, cols = self.shape
        return HEADER.pack(self.codec.encode("ascii"), _DTYPE_CODES[self.dtype], rows, cols,
                           self.abs_bound) + self.payload

    @classmethod
    def from_bytes(cls, data: bytes) -> "Compressed":
        if len(data) < HEADER.size:
            raise ValueError(f"compressed matrix of {len(data)} bytes is shorter than its {HEADER.size}-byte header")
        name, dtype, rows, cols, bound = HEADER.unpack_from(data)
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"compressed matrix header has an unknown dtype code {dtype}")
        return cls(name.rstrip(b"\0").decode("ascii"), (rows, cols), bound, bytes(data[HEADER.size:]),
                   _DTYPE_NAMES[dtype])

    @property
    def nbytes(self) -> int:
        return HEADER.size + len(self.payload)

    @property
    def bits(self) -> WeightBits:
        return WeightBits(numel=self.shape[0] * self.shape[1], payload_bits=8 * len(self.payload),
                          header_bits=8 * HEADER.size)


def _as_matrix(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"a codec compresses non-empty 2-D weight matrices, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise TypeError(f"a codec compresses floating-point weights, got {w.dtype}")
    return np.ascontiguousarray(w, dtype=np.float32)


class Codec(ABC):
    """An error-bounded lossy compressor of float32 matrices.

    Subclasses implement ``_encode`` (float32 matrix, absolute tolerance -> the codec's stream) and ``_decode``;
    ``compress``/``decompress`` add the container header and resolve ``abs``/``rel``/``bpw`` bounds. Register a
    new codec in :data:`CODECS`.
    """

    name: str = ""

    @abstractmethod
    def _encode(self, w: np.ndarray, abs_bound: float) -> bytes:
        """The codec's stream for float32 C-contiguous ``w`` with every error at most ``abs_bound``."""

    @abstractmethod
    def _decode(self, payload: bytes, shape: tuple[int, int]) -> np.ndarray:
        """Inverse of ``_encode``: a float32 matrix of ``shape``."""

    def compress(self, w: np.ndarray, bound: ErrorBound | float, dtype: str = "float32") -> Compressed:
        """Compress matrix ``w`` under ``bound`` (an :class:`ErrorBound` or an absolute tolerance).

        ``dtype`` names the dtype of the tensor ``w`` came from, stored so the decoder can cast back.
        """
        w = _as_matrix(w)
        if isinstance(bound, ErrorBound) and bound.kind == "bpw":
            abs_bound = search_bound(self, [w], bound.value).abs_bounds[0]
        else:
            abs_bound = bound.absolute(w) if isinstance(bound, ErrorBound) else float(bound)
        if not 0 < abs_bound < math.inf:
            raise ValueError(f"the absolute error bound must be positive and finite, got {abs_bound!r}")
        return Compressed(self.name, (int(w.shape[0]), int(w.shape[1])), abs_bound, self._encode(w, abs_bound),
                          dtype)

    def decompress(self, compressed: Compressed | bytes) -> np.ndarray:
        """The float32 matrix back from a :class:`Compressed` (or its ``to_bytes()``)."""
        if not isinstance(compressed, Compressed):
            compressed = Compressed.from_bytes(compressed)
        if compressed.codec != self.name:
            raise ValueError(f"this matrix was compressed with {compressed.codec!r}, not {self.name!r}")
        out = self._decode(compressed.payload, compressed.shape)
        if out.shape != compressed.shape:
            raise ValueError(f"{self.name} decoded shape {out.shape}, the header says {compressed.shape}")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SZ3Codec(Codec):
    """SZ3 (``pysz``) in absolute-error mode (its default prediction pipeline).

    The ``pysz`` 1.1 wheel is built without OpenMP and holds the GIL during a call: one call uses one core
    whatever ``OMP_NUM_THREADS`` says (``szConfig.openmp`` is accepted and changes nothing).
    """

    name = "sz3"

    def _encode(self, w: np.ndarray, abs_bound: float) -> bytes:
        pysz = _require("pysz", "the SZ3 codec")
        config = pysz.szConfig(w.shape)
        config.errorBoundMode = pysz.szErrorBoundMode.ABS
        config.absErrorBound = abs_bound
        stream, _ratio = pysz.sz.compress(w, config)
        return stream.tobytes()

    def _decode(self, payload: bytes, shape: tuple[int, int]) -> np.ndarray:
        pysz = _require("pysz", "the SZ3 codec")
        out, _config = pysz.sz.decompress(np.frombuffer(payload, dtype=np.uint8), np.float32, shape)
        return out


class ZFPCodec(Codec):
    """ZFP (``zfpy``) in fixed-accuracy mode, tolerance = the absolute bound.

    ZFP codes bit planes, so its size moves in steps of about one bit per weight for every halving of the
    tolerance, and its real maximum error is typically 2-4x below the tolerance. ``zfpy`` uses ZFP's serial
    execution policy (its libzfp is built with OpenMP, but zfpy never selects it): one core per call.
    """

    name = "zfp"

    def _encode(self, w: np.ndarray, abs_bound: float) -> bytes:
        zfpy = _require("zfpy", "the ZFP codec")
        return bytes(zfpy.compress_numpy(w, tolerance=abs_bound))  # with ZFP's header: shape, type, mode

    def _decode(self, payload: bytes, shape: tuple[int, int]) -> np.ndarray:
        zfpy = _require("zfpy", "the ZFP codec")
        return np.asarray(zfpy.decompress_numpy(payload), dtype=np.float32)


CODECS: dict[str, type[Codec]] = {codec.name: codec for codec in (SZ3Codec, ZFPCodec)}


def get_codec(name: str) -> Codec:
    """The codec registered as ``name`` (``sz3``, ``zfp``); an unknown name -> one-line ValueError."""
    try:
        return CODECS[str(name).lower()]()
    except KeyError:
        raise ValueError(f"unknown codec {name!r}: expected one of {', '.join(CODECS)}") from None


# --------------------------------------------------------------------------------------------------------------
# Bits-target search


class UnreachableBits(ValueError):
    """A bits-per-weight target the codec cannot land on; ``nearest`` is the closest (bits, scale) seen."""

    def __init__(self, message: str, nearest: tuple[float, float] | None = None):
        super().__init__(message)
        self.nearest = nearest


@dataclass(frozen=True)
class BoundSearch:
    """Result of :func:`search_bound`.

    Attributes:
        bound: ``rel:s`` (every matrix gets s x its mean |w|) or ``abs:s``.
        abs_bounds: the absolute tolerance of every matrix, in order.
        bits: the real bits of all matrices together at that bound.
        target_bpw: the target; ``bits.bits_per_weight`` is within ``rel_tol`` of it.
        evaluations: compressions of the whole set the search took.
    """

    bound: ErrorBound
    abs_bounds: tuple[float, ...]
    bits: WeightBits
    target_bpw: float
    evaluations: int

    @property
    def bits_per_weight(self) -> float:
        return self.bits.bits_per_weight


# The search spans bounds from 1e-6 x mean|w| (about float32's resolution: both codecs are then near lossless)
# to 1e3 x mean|w| (everything rounds to a constant).
SEARCH_RANGE = (1e-6, 1e3)


def search_bound(codec: Codec, matrices: Sequence[np.ndarray] | np.ndarray, target_bpw: float, *,
                 relative: bool = True, rel_tol: float = 0.02, max_steps: int = 80) -> BoundSearch:
    """The error bound at which ``codec`` stores ``matrices`` in ``target_bpw`` bits per weight (within ``rel_tol``).

    One scale s is searched for the whole set: every matrix gets ``s x its own mean |w|`` (``relative``, the
    study's parameterisation) or ``s`` itself. Bits are the real compressed bytes with headers
    (:attr:`Compressed.bits`) over all matrices. Bisection on log(s): size falls with the bound, though not
    strictly (SZ3's size can rise a few % when the bound grows; ZFP's falls in one-bit steps), so the search
    keeps a bracket and raises :class:`UnreachableBits` (a ValueError, one line, with the nearest size seen) when
    the bracket closes without landing, or when the target lies beyond what the range of bounds gives.
    """
    mats = [_as_matrix(matrices)] if isinstance(matrices, np.ndarray) else [_as_matrix(m) for m in matrices]
    if not mats:
        raise ValueError("search_bound needs at least one matrix")
    if isinstance(target_bpw, bool) or not 0 < float(target_bpw) < math.inf:
        raise ValueError(f"the bits-per-weight target must be a positive finite number, got {target_bpw!r}")
    target = float(target_bpw)
    if relative:
        refs = [max(mean_abs(m), float(np.finfo(np.float32).tiny)) for m in mats]
    else:
        overall = sum(mean_abs(m) * m.size for m in mats) / sum(m.size for m in mats)
        refs = [1.0] * len(mats)
    lo, hi = SEARCH_RANGE if relative else (SEARCH_RANGE[0] * overall, SEARCH_RANGE[1] * overall)
    evaluations = 0
    best: tuple[float, float, WeightBits] | None = None  # (|miss|, scale, bits)

    def size_at(scale: float) -> WeightBits:
        nonlocal evaluations, best
        evaluations += 1
        bits = WeightBits(0, 0.0)
        for m, ref in zip(mats, refs):
            bits = bits + codec.compress(m, scale * ref).bits
        miss = abs(bits.bits_per_weight - target)
        if best is None or miss < best[0]:
            best = (miss, scale, bits)
        return bits

    def found(scale: float, bits: WeightBits) -> BoundSearch:
        bound = ErrorBound("rel" if relative else "abs", scale)
        logger.debug("%s: %s gives %.4f bits per weight (target %g, %d compressions)", codec.name, bound,
                     bits.bits_per_weight, target, evaluations)
        return BoundSearch(bound, tuple(scale * ref for ref in refs), bits, target, evaluations)

    def lands(bits: WeightBits) -> bool:
        return abs(bits.bits_per_weight - target) <= rel_tol * target

    unit = "x mean|w|" if relative else ""
    bits_lo = size_at(lo)
    if lands(bits_lo):
        return found(lo, bits_lo)
    if bits_lo.bits_per_weight < target:
        raise UnreachableBits(f"{codec.name} cannot reach {target:g} bits per weight: even its finest bound tried "
                              f"({lo:.3g}{unit}) gives {bits_lo.bits_per_weight:.3f}",
                              (bits_lo.bits_per_weight, lo))
    bits_hi = size_at(hi)
    if lands(bits_hi):
        return found(hi, bits_hi)
    if bits_hi.bits_per_weight > target:
        raise UnreachableBits(f"{codec.name} cannot go down to {target:g} bits per weight: even its coarsest bound "
                              f"tried ({hi:.3g}{unit}) takes {bits_hi.bits_per_weight:.3f}",
                              (bits_hi.bits_per_weight, hi))
    for _ in range(max_steps):
        mid = math.sqrt(lo * hi)
        bits = size_at(mid)
        if lands(bits):
            return found(mid, bits)
        if bits.bits_per_weight > target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-7:
            break
    assert best is not None
    _, scale, bits = best
    raise UnreachableBits(f"{codec.name} cannot land within {100 * rel_tol:g}% of {target:g} bits per weight: its "
                          f"size jumps there; nearest {bits.bits_per_weight:.3f} at bound {scale:.4g}{unit}",
                          (bits.bits_per_weight, scale))


# --------------------------------------------------------------------------------------------------------------
# Compressing model tensors


@dataclass(frozen=True)
class CompressionStats:
    """What compressing one matrix cost and did.

    Attributes:
        codec: codec name.
        bound: the bound asked for.
        abs_bound: the absolute tolerance the codec ran with (resolved from ``rel``, or found for ``bpw``).
        bits: its bits (``bits.bits_per_weight``, ``bits.total_bytes``): codec stream + container header.
        codec_max_abs_error: max |w - w'| of the float32 decode (at most ``abs_bound``).
        max_abs_error: max |w - w'| of the returned tensor; above ``codec_max_abs_error`` only when the tensor's
            dtype is narrower than float32 (the decoder rounds the float32 decode to it, up to half an ulp more).
    """

    codec: str
    bound: ErrorBound
    abs_bound: float
    bits: WeightBits
    codec_max_abs_error: float
    max_abs_error: float

    @property
    def bits_per_weight(self) -> float:
        return self.bits.bits_per_weight

    @property
    def nbytes(self) -> int:
        return int(self.bits.total_bytes)

    def as_dict(self) -> dict[str, Any]:
        return {"codec": self.codec, "bound": str(self.bound), "abs_bound": self.abs_bound,
                "bits_per_weight": self.bits_per_weight, "bytes": self.nbytes,
                "codec_max_abs_error": self.codec_max_abs_error, "max_abs_error": self.max_abs_error}


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def compress_matrix(w: "torch.Tensor", codec: Codec | str, bound: ErrorBound | str
                    ) -> tuple["torch.Tensor", CompressionStats]:
    """Compress and decompress one weight matrix: ``(w' in w's dtype and device, stats)``.

    The evaluated model uses ``w'``. For float32 weights every |w - w'| <= ``stats.abs_bound``. For bf16/fp16
    weights the float32 decode is rounded to the model's dtype, as a decoder would, which can add half an ulp
    of that dtype (``stats.max_abs_error`` says what it did); evaluate in float32 to keep the hard bound.
    """
    import torch

    codec = get_codec(codec) if isinstance(codec, str) else codec
    bound = parse_bound(bound) if isinstance(bound, str) else bound
    if w.dim() != 2:
        raise ValueError(f"compress_matrix takes a 2-D weight, got shape {tuple(w.shape)}")
    dtype_name = str(w.dtype).removeprefix("torch.")
    if dtype_name not in _DTYPE_CODES:
        raise TypeError(f"compress_matrix takes float32, bfloat16 or float16 weights, got {w.dtype}")
    original = w.detach().to("cpu", torch.float32).numpy()
    compressed = codec.compress(original, bound, dtype=dtype_name)
    decoded = codec.decompress(compressed.to_bytes())  # decode from the bytes that would move
    restored = torch.from_numpy(decoded).to(w.dtype)
    stats = CompressionStats(
        codec=codec.name, bound=bound, abs_bound=compressed.abs_bound, bits=compressed.bits,
        codec_max_abs_error=_max_abs_diff(decoded, original),
        max_abs_error=_max_abs_diff(restored.float().numpy(), original),
    )
    return restored.to(w.device), stats


# --------------------------------------------------------------------------------------------------------------
# Throughput


@dataclass(frozen=True)
class Throughput:
    """Compress / decompress speed of a codec, in MB/s of uncompressed float32 (1 MB = 1e6 bytes).

    ``threads`` worker processes each compress their share of the matrices at the same time; a round's time is
    the slowest worker's; ``compress_s`` / ``decompress_s`` are the medians over ``repeats`` rounds.
    """

    codec: str
    threads: int
    compress_mb_s: float
    decompress_mb_s: float
    compress_s: float
    decompress_s: float
    numel: int
    bits_per_weight: float
    repeats: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run_share(codec: Codec, share: list[np.ndarray], abs_bounds: list[float], repeats: int,
               barrier: Any = None) -> tuple[list[float], list[float], int]:
    """Time ``repeats`` rounds of compressing and decompressing ``share`` (after one untimed warm-up round);
    ``barrier`` lines up the workers before every timed phase. Returns (compress s, decompress s, bytes)."""
    compress_s, decompress_s = [], []
    streams = [codec._encode(m, b) for m, b in zip(share, abs_bounds)]
    for s, m in zip(streams, share):
        codec._decode(s, m.shape)
    for _ in range(repeats):
        if barrier is not None:
            barrier.wait()
        start = time.perf_counter()
        streams = [codec._encode(m, b) for m, b in zip(share, abs_bounds)]
        compress_s.append(time.perf_counter() - start)
        if barrier is not None:
            barrier.wait()
        start = time.perf_counter()
        for s, m in zip(streams, share):
            codec._decode(s, m.shape)
        decompress_s.append(time.perf_counter() - start)
    return compress_s, decompress_s, sum(HEADER.size + len(s) for s in streams)


def _throughput_worker(codec: Codec, share: list[np.ndarray], abs_bounds: list[float], repeats: int,
                       barrier: Any, results: Any, index: int) -> None:
    try:
        results.put((index, _run_share(codec, share, abs_bounds, repeats, barrier)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        barrier.abort()
        results.put((index, f"{type(exc).__name__}: {exc}"))


def available_cpus() -> int:
    """CPU cores this process may run on (the "all threads" count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def measure_throughput(codec: Codec | str, matrices: Sequence[np.ndarray] | np.ndarray,
                       bound: ErrorBound | str | float, threads: int = 1, repeats: int = 5,
                       start_method: str = "spawn") -> Throughput:
    """Compress and decompress MB/s of ``codec`` on ``matrices`` with ``threads`` parallel workers.

    Neither codec parallelises one call (see :class:`SZ3Codec`, :class:`ZFPCodec`: no OpenMP is used, so
    ``OMP_NUM_THREADS``, at import time or later, changes nothing; pysz also holds the GIL, so Python threads
    would run one at a time), so "all threads" means what offloading would do: ``threads`` worker *processes*
    compressing different matrices at once (matrices are split into row blocks, each its own stream, when there
    are fewer matrices than workers); :func:`available_cpus` is the machine's count. ``threads=1`` runs here.
    Timings are medians over ``repeats`` rounds after one untimed warm-up. Workers start with multiprocessing's
    ``start_method`` (start-up is not timed): ``spawn`` by default, safe in a process that runs torch threads; a
    script that calls this with ``threads > 1`` then needs the usual ``if __name__ == "__main__":`` guard.
    ``bound`` must be ``abs`` or ``rel`` (resolve a ``bpw`` bound with :func:`search_bound` first).
    """
    codec = get_codec(codec) if isinstance(codec, str) else codec
    bound = parse_bound(bound) if isinstance(bound, str) else bound
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    mats = [_as_matrix(matrices)] if isinstance(matrices, np.ndarray) else [_as_matrix(m) for m in matrices]
    if not mats:
        raise ValueError("measure_throughput needs at least one matrix")
    if len(mats) < threads:  # give every worker something to do
        per = -(-threads // len(mats))
        mats = [block for m in mats for block in np.array_split(m, min(per, m.shape[0])) if block.size]
    bounds = [bound.absolute(m) if isinstance(bound, ErrorBound) else float(bound) for m in mats]
    numel = sum(m.size for m in mats)
    if threads == 1:
        compress_s, decompress_s, nbytes = _run_share(codec, mats, bounds, repeats)
    else:
        ctx = multiprocessing.get_context(start_method)
        barrier, results = ctx.Barrier(threads), ctx.Queue()
        workers = [ctx.Process(target=_throughput_worker, daemon=True,
                               args=(codec, mats[i::threads], bounds[i::threads], repeats, barrier, results, i))
                   for i in range(threads)]
        for p in workers:
            p.start()
        outcomes: dict[int, Any] = {}
        try:
            while len(outcomes) < threads:
                try:
                    index, outcome = results.get(timeout=1.0)
                    outcomes[index] = outcome
                except queue.Empty:
                    # a worker exits 0 only after its result is queued; any other exit is a crash
                    dead = [p.exitcode for p in workers if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"a throughput worker exited with code {dead[0]} without a result "
                                           "(a script calling this needs an `if __name__ == '__main__':` guard)"
                                           ) from None
        finally:
            barrier.abort()  # releases workers still waiting if one failed
            for p in workers:
                p.join()
        errors = [o for o in outcomes.values() if isinstance(o, str)]
        if errors:
            raise RuntimeError(f"a throughput worker failed: {errors[0]}")
        # every round starts together (barrier), so a round lasts as long as its slowest worker
        compress_s = [max(o[0][r] for o in outcomes.values()) for r in range(repeats)]
        decompress_s = [max(o[1][r] for o in outcomes.values()) for r in range(repeats)]
        nbytes = sum(o[2] for o in outcomes.values())
    megabytes = 4 * numel / 1e6
    compress_median, decompress_median = statistics.median(compress_s), statistics.median(decompress_s)
    return Throughput(codec=codec.name, threads=threads, compress_mb_s=megabytes / compress_median,
                      decompress_mb_s=megabytes / decompress_median, compress_s=compress_median,
                      decompress_s=decompress_median, numel=numel, bits_per_weight=8 * nbytes / numel,
                      repeats=repeats)


# --------------------------------------------------------------------------------------------------------------
# The study's simulated compression


NOISE_LEVELS = (0.1, 0.3, 0.5, 0.8)  # the study's p (10/30/50/80% of mean |w|)


def gaussian_noise(w: "torch.Tensor", p: float, generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """``w + N(0, e^2)`` with standard deviation ``e = p x mean|w|`` of this matrix (arXiv 2509.07727's model).

    Noise is drawn in float32 on the CPU (``generator`` makes it reproducible), added in float32 and returned in
    ``w``'s dtype and device. ``w`` is not modified.
    """
    import torch

    if isinstance(p, bool) or not 0 <= float(p) < math.inf:
        raise ValueError(f"noise level p must be a non-negative finite number, got {p!r}")
    w32 = w.detach().to("cpu", torch.float32)
    e = float(p) * float(w32.abs().double().mean()) if w32.numel() else 0.0
    noise = torch.randn(w32.shape, generator=generator, dtype=torch.float32) * e
    return (w32 + noise).to(w.dtype).to(w.device)


@dataclass(frozen=True)
class ErrorHistogram:
    """SZ3's (or any codec's) real error ``w - w'`` against the study's Normal model, on common bins.

    Densities integrate to 1 over the bins (per unit of error). ``normal_at_bound`` is N(0, bound^2): the study's
    model at ``e = bound`` (the same nominal level as the codec's maximum error); ``normal_matched_std`` is the
    Normal with the real error's standard deviation. Normal densities are exact bin probabilities / widths.
    """

    codec: str
    abs_bound: float
    mean_abs_w: float
    edges: np.ndarray
    real_density: np.ndarray
    normal_at_bound_density: np.ndarray
    normal_matched_std_density: np.ndarray
    real_mean: float
    real_std: float
    real_max_abs: float
    bits_per_weight: float


def _normal_bin_density(edges: np.ndarray, std: float) -> np.ndarray:
    if std <= 0:
        return np.zeros(len(edges) - 1)
    cdf = np.array([0.5 * (1 + math.erf(x / (std * math.sqrt(2)))) for x in edges])
    return np.diff(cdf) / np.diff(edges)


def error_histogram(w: "torch.Tensor | np.ndarray", bound: ErrorBound | str | float, codec: Codec | str = "sz3",
                    bins: int = 101) -> ErrorHistogram:
    """Histogram of ``w - w'`` for ``codec`` at ``bound`` (e.g. ``rel:0.3``: the study's p = 30%) on matrix ``w``,
    with the two Normal references of :class:`ErrorHistogram`. Bins span ±1.5 x the larger of the bound and
    3 x the real error's std, so the Normal's tails show."""
    codec = get_codec(codec) if isinstance(codec, str) else codec
    bound = parse_bound(bound) if isinstance(bound, str) else bound
    original = w.detach().cpu().float().numpy() if hasattr(w, "detach") else _as_matrix(w)
    compressed = codec.compress(original, bound)
    error = original.astype(np.float64) - codec.decompress(compressed).astype(np.float64)
    std = float(error.std())
    span = 1.5 * max(compressed.abs_bound, 3 * std)
    edges = np.linspace(-span, span, bins + 1)
    real, _ = np.histogram(error, bins=edges, density=True)
    return ErrorHistogram(
        codec=codec.name, abs_bound=compressed.abs_bound, mean_abs_w=mean_abs(original), edges=edges,
        real_density=real, normal_at_bound_density=_normal_bin_density(edges, compressed.abs_bound),
        normal_matched_std_density=_normal_bin_density(edges, std), real_mean=float(error.mean()), real_std=std,
        real_max_abs=float(np.abs(error).max()), bits_per_weight=compressed.bits.bits_per_weight,
    )


def plot_error_histogram(hist: ErrorHistogram, path: str | Path, title: str | None = None) -> Path:
    """Write the histogram of :func:`error_histogram` as a PNG at ``path`` (returned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centers = (hist.edges[:-1] + hist.edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.bar(centers, hist.real_density, width=np.diff(hist.edges), color="tab:blue", alpha=0.6,
           label=f"{hist.codec} real error ({hist.bits_per_weight:.2f} bits/weight)")
    ax.plot(centers, hist.normal_at_bound_density, color="tab:red",
            label=f"N(0, e), e = bound = {hist.abs_bound:.3g}")
    ax.plot(centers, hist.normal_matched_std_density, color="tab:green", linestyle="--",
            label=f"N(0, std of real error = {hist.real_std:.3g})")
    for x in (-hist.abs_bound, hist.abs_bound):
        ax.axvline(x, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("w - w'")
    ax.set_ylabel("density")
    ax.set_title(title or f"{hist.codec} error vs the Normal noise model "
                          f"(bound = {hist.abs_bound / hist.mean_abs_w:.2f} x mean|w|)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------
# Quantized weights: bits moved per weight, packed and losslessly coded

# tensor of the packed export -> the WeightBits part it fills
_PACKED_PARTS = {"qweight": "payload_bits", "scales": "scale_bits", "qzeros": "zero_bits", "g_idx": "index_bits"}


def _packed_tensors(qw: "QuantizedWeight") -> dict[str, np.ndarray]:
    """The tensors the packed export writes for ``qw`` (its :class:`PackedLinear` state dict) as numpy arrays."""
    import torch

    from .runtime.packed_modules import PackedLinear

    state = PackedLinear.from_quantized(qw).state_dict()
    unknown = set(state) - set(_PACKED_PARTS)
    if unknown:
        raise ValueError(f"the packed export stores tensor(s) this accounting does not know: {sorted(unknown)}")
    # as raw bytes: numpy has no bfloat16, and the byte string is what moves
    return {name: t.contiguous().view(-1).view(torch.uint8).numpy() for name, t in state.items()}


def packed_bits(qw: "QuantizedWeight") -> WeightBits:
    """Bits of ``qw`` exactly as the packed export stores it (``PackedLinear``: ``qweight`` int32 codes,
    ``scales`` fp16, ``qzeros`` int32 words, ``g_idx`` int32 per input column; the tensor data of the
    safetensors file, its JSON header not counted). :class:`~eacmoe.schedule.BitsAccount` counts codes, scales
    and zeros (at b bits, no word padding) but not ``g_idx``, which here costs 32 / out_features bits per weight."""
    parts = {field: 0.0 for field in _PACKED_PARTS.values()}
    for name, data in _packed_tensors(qw).items():
        parts[_PACKED_PARTS[name]] += 8 * data.nbytes
    return WeightBits(numel=int(qw.codes.numel()), **parts)


def shannon_entropy(counts: Sequence[int] | np.ndarray) -> float:
    """Order-0 entropy in bits per symbol of a histogram, ``-sum p log2 p``."""
    counts = np.asarray(counts, dtype=np.float64)
    if (counts < 0).any():
        raise ValueError("a histogram cannot hold negative counts")
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def code_entropy_bits(qw: "QuantizedWeight") -> float:
    """Order-0 empirical entropy of ``qw``'s codes, in bits per code."""
    codes = qw.codes.detach().cpu().reshape(-1).numpy().astype(np.int64)
    return shannon_entropy(np.bincount(codes, minlength=1 << qw.bits))


def entropy_bits(qw: "QuantizedWeight") -> WeightBits:
    """Bits per weight of an ideal order-0 entropy coder on ``qw``'s codes: numel x entropy, plus the symbol
    frequency table it must send (2**bits counts of 32 bits), plus the side tables as the packed export stores
    them (scales, zeros, g_idx, not entropy-coded). A lower bound for coders that see codes one at a time;
    a coder that sees context (zstd on packed words) can go below it."""
    packed = packed_bits(qw)
    return WeightBits(numel=packed.numel, payload_bits=packed.numel * code_entropy_bits(qw),
                      scale_bits=packed.scale_bits, zero_bits=packed.zero_bits, index_bits=packed.index_bits,
                      header_bits=32 * (1 << qw.bits))


ZSTD_LEVEL = 3  # zstd's default; on packed words level 19 gains < 1% (measured on tiny-mixtral experts)


def zstd_bits(qw: "QuantizedWeight", level: int = ZSTD_LEVEL) -> WeightBits:
    """Real lossless compression: each tensor of the packed export (``qweight``, ``scales``, ``qzeros``,
    ``g_idx``) as its own zstd frame (frame headers included); bits = the frames' bytes x 8."""
    zstandard = _require("zstandard", "zstd coding of quantized codes")
    compressor = zstandard.ZstdCompressor(level=level)
    parts = {field: 0.0 for field in _PACKED_PARTS.values()}
    for name, data in _packed_tensors(qw).items():
        parts[_PACKED_PARTS[name]] += 8 * len(compressor.compress(data.tobytes()))
    return WeightBits(numel=int(qw.codes.numel()), **parts)


def quantized_bits_moved(qw: "QuantizedWeight", zstd_level: int = ZSTD_LEVEL) -> dict[str, WeightBits]:
    """``{"packed", "entropy", "zstd"}``: the bits moved per weight of ``qw`` as packed, as an ideal order-0
    entropy coder would send its codes, and as real zstd frames of the packed tensors."""
    return {"packed": packed_bits(qw), "entropy": entropy_bits(qw), "zstd": zstd_bits(qw, zstd_level)}
