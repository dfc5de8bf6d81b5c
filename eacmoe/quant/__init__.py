"""Weight quantization: GPTQ-style integer grids, the RTN baseline and our own GPTQ solver."""

from .gptq import GPTQ, MAX_DAMP_PERCENT, GPTQResult, proxy_loss
from .grid import (
    SUPPORTED_BITS,
    QuantizedWeight,
    QuantSpec,
    dequantize_codes,
    fit_grid,
    quantize_to_codes,
    rtn_quantize,
)

__all__ = [
    "GPTQ",
    "GPTQResult",
    "MAX_DAMP_PERCENT",
    "SUPPORTED_BITS",
    "QuantSpec",
    "QuantizedWeight",
    "dequantize_codes",
    "fit_grid",
    "proxy_loss",
    "quantize_to_codes",
    "rtn_quantize",
]
