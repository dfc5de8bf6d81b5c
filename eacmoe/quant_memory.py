"""Peak memory of quantizing one decoder layer, from the config alone: the formula of docs/MEMORY.md.

The pipeline (pipeline.py) goes through a layer in phases; each phase holds the resident state plus its own
transients, and the layer's peak is the largest phase. With b the compute dtype's bytes, N = nsamples x seqlen
calibration tokens, H the hidden size, W the layer's weights at b, and ws(r, c) the GPTQ workspace of an [r, c]
matrix (below):

    resident  R = base + skeleton (embeddings, final norm, head at b) + streams (N H b each: quantized, and FP for QESC)
    load        R + lambda_load W          transformers' fusing of the per-expert tensors (lambda_load measured)
    router      R + 2W + 4 N H b + router  layer + FP copy (QESC), both streams' block inputs and their residuals
                                           (host), fp32 token subsets
    fp advance  R + 2W + 4 N H b           the FP stream from its residual + the FP block (written into the residual)
    experts     R + W + 2 N H b + B ws     the FP copy is gone; the block input, its residual (host); the Hessians
                                           and factorisation of B experts' matrices at a time (B = 1 at real shapes)
    advance     R + W + 2 N H b            the quantized stream from its residual + the quantized block
    save        R + (1 + lambda_save) W    the progress file: safetensors serializes the layer's bytes first

    ws(r, c) = max(4 c^2 + chunks, 16 c^2, 8 c^2 + 12 r c)
        factorisation: the solver's Hessian, its clone, the reversed damped copy and its Cholesky factor, then the
        factor reversed into the feedback matrix (4 fp32 c x c at a time); then the column loop: Hessian + feedback
        matrix, weight, codes, losses (fp32 r x c)
    down_proj of an expert adds the gate/up solver's Hessian (4 H^2) and the quantized gate and up (2 I H b).
    --gptq-target fp[:A] (quant/asymmetric.py) keeps the FP stream's block input through the experts phase (N H b more
    on the device) and gives each expert matrix the asymmetric workspace
    aws(r, c) = max(ws(r, c) + 4 c^2, 24 c^2 + 16 r c): the cross matrix C beside H throughout; computing the target
    W* = W (C + l I)(H + l I)^-1 after the factorisation holds H, C, the feedback matrix, clones of H and C, the
    Cholesky factor (6 fp32 c x c) and the fp32 weight, W C, the solve's copy of it and W* (4 fp32 r x c); down_proj
    adds the gate/up solver's H and C (8 H^2).
    B = max(1, loop rows // min(2 I, H)) experts share the solver's column loops (quant.gptq.GPTQ_LOOP_ROWS = 1024):
    small experts only (tiny models, not Mixtral's or Qwen3's); B ws bounds their workspace from above.

On CUDA the weights of the current layer, the block inputs and the GPTQ workspace are on the device; the streams,
the skeleton, the quantized codes (moved off as produced) and the progress files are in host memory. So the
device peak is max(router, fp advance, experts) without R, and the host holds R plus what loading and saving
need. lambda_load and lambda_save are properties of transformers and safetensors, measured once on a real-shape
layer (scripts/measure_real_shape_memory.py): they are inputs here, like the base RSS of the process.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .adapters import get_adapter
from .quant.gptq import GPTQ_LOOP_ROWS

ROUTER_MAX_TOKENS = 32768          # router_calibration.RouterCalibrationConfig.max_tokens
HESSIAN_CHUNK_BYTES = 64 * 2**20   # quant.gptq.GPTQ.max_chunk_bytes
STATISTICS_BUDGET_BYTES = 256 * 2**20  # router_calibration.STATISTICS_BUDGET_BYTES


@dataclass
class LayerShapes:
    """What the formula needs of one MoE decoder layer."""
    hidden: int
    experts: int
    expert_intermediate: int
    layer_params: int               # every parameter of the layer
    expert_params: int              # the routed experts' parameters
    attention: list[tuple[int, int]]  # [out, in] of each quantized attention Linear
    skeleton_params: int            # embeddings, final norm, lm_head

    @property
    def expert_matrices(self) -> list[tuple[int, int]]:
        i, h = self.expert_intermediate, self.hidden
        return [(i, h), (i, h), (h, i)]


def layer_shapes(config: Any, layer: int = 0) -> LayerShapes:
    """The shapes of decoder layer `layer` from the family adapter's parameter inventory (no weights read)."""
    adapter = get_adapter(config)
    specs = adapter.weight_inventory(config)
    in_layer = [s for s in specs if s.layer == layer]
    return LayerShapes(
        hidden=config.hidden_size, experts=adapter.config_num_experts(config),
        expert_intermediate=adapter.config_expert_intermediate_size(config),
        layer_params=sum(s.numel for s in in_layer),
        expert_params=sum(s.numel for s in in_layer if s.component == "routed_experts"),
        attention=[tuple(s.shape) for s in in_layer if s.component == "attention" and s.linear],
        skeleton_params=sum(s.numel for s in specs if s.layer is None))


def gptq_workspace(rows: int, columns: int, tokens: int) -> int:
    """Bytes GPTQ holds for one [rows, columns] matrix (module docstring): the largest of accumulating its Hessian
    (two fp32 input chunks of at most HESSIAN_CHUNK_BYTES beside it), factorising it, and the column loop."""
    accumulation = 4 * columns**2 + 2 * min(HESSIAN_CHUNK_BYTES, 4 * tokens * columns)  # freed before quantize
    factorisation = 16 * columns**2
    column_loop = 8 * columns**2 + 12 * rows * columns
    return max(accumulation, factorisation, column_loop)


def asymmetric_workspace(rows: int, columns: int, tokens: int) -> int:
    """Bytes `--gptq-target fp` holds for one [rows, columns] matrix (module docstring): GPTQ's workspace with the
    cross matrix beside it, or computing the fitted target, whichever is larger."""
    return max(gptq_workspace(rows, columns, tokens) + 4 * columns**2, 24 * columns**2 + 16 * rows * columns)


def router_workspace(tokens: int, hidden: int, experts: int) -> int:
    """The fp32 token subsets of both streams, target logits and the objective (tokens or statistics)."""
    n = min(tokens, ROUTER_MAX_TOKENS)
    subsets = 2 * n * hidden * 4 + 3 * n * experts * 4
    statistics = 2 * experts * hidden**2 * 8
    if statistics <= max(STATISTICS_BUDGET_BYTES, n * hidden * 4):
        return subsets + statistics + n * hidden * 8
    return subsets + 2 * n * experts * 4


@dataclass
class QuantMemory:
    """The formula's terms and phases, in bytes."""
    terms: dict[str, int]
    phases: dict[str, int]          # host + device on CPU; see `device_phases` for CUDA
    device_phases: dict[str, int]   # what lives on the compute device (CUDA): weights, block inputs, workspace
    peak_phase: str = ""
    peak: int = 0
    inputs: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_peak(shapes: LayerShapes, tokens: int, dtype_bytes: int, method: str = "qesc", base: int = 0,
               lambda_load: float = 2.5, lambda_save: float = 1.0, pooled_experts: bool = True,
               gptq_experts: bool = True, fp_target: bool = False) -> QuantMemory:
    """Peak memory of quantizing one layer (module docstring). `pooled_experts`: an expert's Hessian is built from
    all N tokens (the pool policy, or a hot expert) rather than its share; `gptq_experts` False when the experts
    are rounded to nearest (then only RTN's fp32 copies of one matrix); `fp_target`: `--gptq-target fp[:A]` (QESC
    only: it needs the FP stream)."""
    b, n, h = dtype_bytes, tokens, shapes.hidden
    qesc = method in ("qesc", "qesc-mse")
    if fp_target and not qesc:
        raise ValueError(f"--gptq-target fp needs the FP stream of --method qesc / qesc-mse (got {method})")
    weights = shapes.layer_params * b
    stream = n * h * b
    expert_tokens = n if pooled_experts else max(1, n * 2 // max(shapes.experts, 1))
    if gptq_experts:
        i = shapes.expert_intermediate
        workspace = asymmetric_workspace if fp_target else gptq_workspace
        gate = workspace(i, h, expert_tokens)
        down = workspace(h, i, expert_tokens) + (8 if fp_target else 4) * h * h + 2 * i * h * b
        experts_per_loop = max(1, GPTQ_LOOP_ROWS // min(2 * i, h))
        expert_ws = experts_per_loop * max(gate, down)
    else:  # RTN: the fp32 weight, its codes and the dequantized copy
        expert_ws = max(3 * 4 * r * c for r, c in shapes.expert_matrices)
    attention_ws = max(gptq_workspace(r, c, n) for r, c in shapes.attention) if method != "rtn" else 0
    terms = {"base": base, "skeleton": shapes.skeleton_params * b, "streams": stream * (2 if qesc else 1),
             "layer": weights, "block_input": stream, "router": router_workspace(n, h, shapes.experts) if qesc else 0,
             "attention_gptq": attention_ws, "expert_gptq": expert_ws,
             "fp_block_input": stream if fp_target else 0}  # --gptq-target fp: the FP rows of the experts' tokens
    resident = terms["base"] + terms["skeleton"] + terms["streams"]
    fp_copy = weights if qesc else 0
    device = {
        "attention": weights + fp_copy + attention_ws,
        "router": weights + fp_copy + 2 * stream + terms["router"] if qesc else 0,
        "fp advance": weights + fp_copy + 2 * stream if qesc else 0,
        "experts": weights + stream + terms["fp_block_input"] + expert_ws,
        "advance": weights + stream,
    }
    # in host memory beside the device's share: the residuals of the block inputs (one per stream alive)
    host = {"attention": 0, "router": 2 * stream if qesc else 0, "fp advance": 2 * stream if qesc else 0,
            "experts": stream, "advance": stream}
    phases = {"load": resident + int(lambda_load * weights),
              **{k: resident + v + host[k] for k, v in device.items()},
              "save": resident + int((1 + lambda_save) * weights)}
    peak_phase = max(phases, key=phases.get)
    return QuantMemory(terms=terms, phases=phases, device_phases=device, peak_phase=peak_phase,
                       peak=phases[peak_phase],
                       inputs={"tokens": tokens, "dtype_bytes": b, "method": method, "lambda_load": lambda_load,
                               "lambda_save": lambda_save, "pooled_experts": pooled_experts,
                               "gptq_experts": gptq_experts, "fp_target": fp_target})
