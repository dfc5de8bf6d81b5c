"""The layer-by-layer QESC pipeline (EAC-MoE section 3): GPTQ with expert-selection calibration.

Two streams of calibration hidden states run through the model one decoder layer at a time: the
full-precision stream (what the FP model computes) and the quantized stream (what the model computes with
every earlier layer already quantized). For each decoder layer, in the paper's order:

  1. quantize attention with GPTQ (4-bit by default) on the quantized stream;
  2. calibrate the router: TopK-MSE between the FP router on the FP stream and the new router on the
     quantized stream (methods qesc / qesc-mse; see router_calibration.py);
  3. quantize each expert with GPTQ on the tokens the (calibrated) router sends to it; the input of an
     expert's down projection is computed with its already-quantized gate and up projections;
  4. advance both streams through the layer (FP stream through an FP copy, quantized stream through the
     quantized layer).

Only the current layer is moved to the compute device. After each layer the progress (quantized layer,
both streams) is written to `<out>/.progress` so an interrupted run resumes to an identical result.

Layers come from a `LayerSource`: the model's own layers (`ModelLayers`, quantized in place), or, for models too
large for memory, layers read from the checkpoint one at a time (`lazy_loading.CheckpointLayers`): then the
quantized layer lives only in the progress directory and is released after it is saved.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .adapters import MoEAdapter, Routing, get_adapter
from .expert_hessian import EXPERT_HESSIANS, get_expert_hessian, weighted_rows
from .gptq_target import FPExpertInputs, check_gptq_target, fp_expert_inputs
from .quant import GPTQ, QuantizedWeight, QuantSpec, rtn_quantize
from .quant.grid import GRID_SEARCHES
from .quant.gptq import GPTQ_LOOP_ROWS, column_loops, quantize_together
from .quant.serialize import quantized_from_tensors, quantized_tensors
from .router_calibration import RouterCalibrationConfig, calibrate_router
from .sparse_experts import SPARSE_EXPERT_POLICIES, LayerRouting, get_sparse_expert_policy
from .weight_scan import scan_weights

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "qesc", "qesc-mse")


class ProgressMismatchError(ValueError):
    """Saved progress belongs to another run: another model, other settings or other calibration tokens."""


@dataclass
class QuantizeConfig:
    """Everything that determines the quantized weights (saved with the progress for --resume checks)."""
    expert_bits: list[int]               # per layer: shared experts, dense MLP and (by default) routed experts
    method: str = "qesc"
    attn_bits: int | None = 4            # None keeps attention in full precision
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    damp_percent: float = 0.01
    grid: str = "minmax"                 # how a group's range is chosen: minmax (the paper's) | mse (quant/grid.py);
    #                                      python -m eacmoe.quantize defaults to mse
    router_topk: int | None = None       # K of TopK-MSE; None = the adapter's default (8 of 16, 20 of 64)
    router_steps: int = 1000
    router_lr: float = 1e-3
    router_solver: str = "adam"          # adam (early-stopped, the default) or ridge (exact; router_calibration.py)
    min_expert_tokens: int | None = None  # below this an expert follows sparse_expert_policy; None = its input width
    sparse_expert_policy: str = "pool"   # pool | rtn | gptqmodel | weighted-pool (sparse_experts.py)
    expert_hessian: str = "routed"       # token weights in expert Hessians: routed | weighted (expert_hessian.py)
    gptq_target: str = "quantized"       # what the experts' GPTQ fits: quantized | fp | fp:A (gptq_target.py)
    batch_size: int = 8
    seed: int = 0
    # per layer, one width per routed expert (None: the layer's width), from `--bits auto:B` (per expert)
    routed_expert_bits: list[list[int] | None] | None = None

    def expert_bits_for(self, layer: int, expert: int) -> int:
        """The width of routed expert `expert` of decoder layer `layer`."""
        table = self.routed_expert_bits[layer] if self.routed_expert_bits is not None else None
        return self.expert_bits[layer] if table is None else table[expert]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.sparse_expert_policy not in SPARSE_EXPERT_POLICIES:
            raise ValueError(f"sparse expert policy must be one of {', '.join(SPARSE_EXPERT_POLICIES)} "
                             f"(got {self.sparse_expert_policy!r})")
        if self.min_expert_tokens is not None and self.min_expert_tokens < 1:
            raise ValueError(f"min_expert_tokens must be at least 1 (got {self.min_expert_tokens})")
        if self.expert_hessian not in EXPERT_HESSIANS:
            raise ValueError(f"expert_hessian must be one of {', '.join(EXPERT_HESSIANS)} (got {self.expert_hessian!r})")
        check_gptq_target(self.gptq_target, self.method)
        if self.grid not in GRID_SEARCHES:
            raise ValueError(f"grid must be one of {', '.join(GRID_SEARCHES)} (got {self.grid!r})")
        if self.router_topk is not None and self.router_topk < 1:  # 0 must not fall back to the default
            raise ValueError(f"router_topk must be at least 1 (got {self.router_topk})")
        if self.routed_expert_bits is not None and len(self.routed_expert_bits) != len(self.expert_bits):
            raise ValueError(f"{len(self.routed_expert_bits)} per-expert width lists for {len(self.expert_bits)} layers")

    def spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, group_size=self.group_size, sym=self.sym, act_order=self.act_order,
                         damp_percent=self.damp_percent, grid=self.grid)

    def fingerprint(self, calib_ids: torch.Tensor, model_fingerprint: str) -> dict:
        """What saved progress must match to be resumed: these settings, the calibration tokens and the model
        (`weight_scan.scan_weights`); kept apart so that a refusal can say which one differs."""
        calibration = hashlib.sha256(str(tuple(calib_ids.shape)).encode())
        calibration.update(calib_ids.numpy().tobytes())
        return {"settings": asdict(self), "calibration": calibration.hexdigest()[:16], "model": model_fingerprint}


def progress_mismatch(saved, current: dict) -> str | None:
    """Why progress saved with fingerprint `saved` cannot be continued by a run with fingerprint `current`, in
    words; None when it can."""
    if not isinstance(saved, dict) or saved.keys() != current.keys():
        return "it was written by another version of eacmoe"
    if saved["model"] != current["model"]:
        return "it was made from another model (other weights or config, or another --dtype)"
    settings = json.loads(json.dumps(current["settings"]))  # as saved: tuples become lists
    changed = [f"{k} {saved['settings'].get(k)!r} -> {v!r}" for k, v in settings.items()
               if saved["settings"].get(k) != v]
    if changed:
        return "it was made with other settings (" + ", ".join(changed) + ")"
    if saved["calibration"] != current["calibration"]:
        return "it was made from other calibration tokens (--calib, --nsamples, --seqlen or the text changed)"
    return None


@dataclass
class LayerReport:
    layer: int
    expert_bits: int
    seconds: dict[str, float] = field(default_factory=dict)
    router: dict | None = None                 # TopK-MSE before/after calibration
    expert_tokens: list[int] | None = None     # calibration tokens routed to each expert
    sparse_experts: list[int] = field(default_factory=list)  # experts that fell under min_expert_tokens
    gptq_loss: dict[str, float] = field(default_factory=dict)


class QuantizedShape(NamedTuple):
    """What the bits accounting needs of a quantized matrix (kept for all layers even when the codes are not)."""
    rows: int
    columns: int
    bits: int
    group_size: int


class LayerSource(Protocol):
    """Where decoder layer i comes from and where it goes after use (quantization, evaluation).

    in_memory: True when the layers live in the model (quantized in place, kept); False when each `load` reads a
    layer into memory and `release` frees it again (lazy loading).
    """
    in_memory: bool

    def __len__(self) -> int: ...

    def load(self, index: int) -> nn.Module: ...

    def release(self, index: int, layer: nn.Module) -> None: ...


class ModelLayers:
    """The decoder layers of a fully materialised model (the default source)."""

    in_memory = True

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, index: int) -> nn.Module:
        return self.layers[index]

    def release(self, index: int, layer: nn.Module) -> None:
        self.layers[index] = layer.to("cpu")  # off the compute device; the model keeps it


def progress_layer_file(progress_dir: Path, index: int) -> Path:
    return progress_dir / f"layer_{index:04d}.safetensors"


def read_progress_state(progress_dir: Path) -> dict | None:
    """The state.json of a progress directory (fingerprint, completed_layers, reports), or None when it has none."""
    path = progress_dir / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_progress_layer(progress_dir: Path, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The quantized layer `index` saved with the progress: (its state dict, layer-relative keys in the model's
    layout; its quantized tensors as written by `quant.serialize.quantized_tensors`)."""
    tensors = load_file(progress_layer_file(progress_dir, index))
    state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    quant = {k.removeprefix("quant."): v for k, v in tensors.items() if k.startswith("quant.")}
    return state, quant


class _StopForward(Exception):
    """Raised by a hook once everything a pass needs has been seen, so the rest of the layer is skipped."""


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def capture_layer_inputs(model: nn.Module, adapter: MoEAdapter, input_ids: torch.Tensor, batch_size: int,
                         device: torch.device) -> tuple[torch.Tensor, dict]:
    """Hidden states entering decoder layer 0 for all sequences, and the keyword arguments the model passes
    to its layers (causal mask, rotary position embeddings); only the embedding runs on `device`."""
    layers = adapter.decoder_layers(model)
    captured: list[torch.Tensor] = []
    layer_kwargs: dict = {}

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden.detach().cpu())
        if not layer_kwargs:
            layer_kwargs.update({k: v for k, v in kwargs.items()
                                 if k not in ("hidden_states", "past_key_values", "use_cache", "cache_position")})
        raise _StopForward

    embed = adapter.embed_tokens(model)
    rotary = adapter.rotary_emb(model)
    embed.to(device)
    if rotary is not None:
        rotary.to(device)
    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                try:
                    model(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
        embed.to("cpu")
        if rotary is not None:
            rotary.to("cpu")
    return torch.cat(captured), layer_kwargs


def _kwargs_for(layer_kwargs: dict, batch: int, device: torch.device) -> dict:
    """Layer kwargs moved to `device`, with batch-sized leading dims cut to the current batch."""
    def fit(v):
        if isinstance(v, torch.Tensor):
            return (v[:batch] if v.dim() > 0 and v.shape[0] > batch else v).to(device)
        if isinstance(v, tuple):
            return tuple(fit(x) for x in v)
        return v
    return {k: fit(v) for k, v in layer_kwargs.items()}


def run_layer(layer: nn.Module, stream: torch.Tensor, layer_kwargs: dict, batch_size: int,
              device: torch.device) -> torch.Tensor:
    """The layer's output for every sequence of the stream (computed in batches on `device`, kept on CPU)."""
    outputs = []
    with torch.no_grad():
        for start in range(0, stream.shape[0], batch_size):
            batch = stream[start:start + batch_size].to(device)
            outputs.append(_first(layer(batch, **_kwargs_for(layer_kwargs, batch.shape[0], device))).cpu())
    return torch.cat(outputs)


def run_until_stopped(layer: nn.Module, stream: torch.Tensor, layer_kwargs: dict, batch_size: int,
                      device: torch.device) -> None:
    """Run the layer on every batch of the stream for its hooks' sake; a hook may end a batch with _StopForward
    once it has seen what it needs."""
    with torch.no_grad():
        for start in range(0, stream.shape[0], batch_size):
            batch = stream[start:start + batch_size].to(device)
            try:
                layer(batch, **_kwargs_for(layer_kwargs, batch.shape[0], device))
            except _StopForward:
                pass


def capture_module_input(layer: nn.Module, module: nn.Module, stream: torch.Tensor, layer_kwargs: dict,
                         batch_size: int, device: torch.device) -> torch.Tensor:
    """What `module` (inside `layer`) receives for every token of the stream, as [tokens, features];
    the layer stops at that module, so nothing after it is computed."""
    inputs = []

    def grab(_module, args, kwargs):
        inputs.append((args[0] if args else next(iter(kwargs.values()))).detach().reshape(-1, stream.shape[-1]))
        raise _StopForward

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run_until_stopped(layer, stream, layer_kwargs, batch_size, device)
    finally:
        handle.remove()
    return torch.cat(inputs)


def capture_block_input(layer: nn.Module, adapter: MoEAdapter, stream: torch.Tensor, layer_kwargs: dict,
                        batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For every sequence of the stream, the layer's residual after attention (the post-attention norm's input,
    [sequences, seq, H], kept on CPU) and its MLP / MoE block input (the norm's output, [tokens, H], on `device`);
    the layer stops at the norm. With both, `advance_from_block` gives the layer's output without recomputing
    attention."""
    residuals, inputs = [], []

    def grab(_module, args, output):
        residuals.append(args[0].detach().cpu())
        inputs.append(output.detach().reshape(-1, stream.shape[-1]))
        raise _StopForward

    handle = adapter.post_attention_norm(layer).register_forward_hook(grab)
    try:
        run_until_stopped(layer, stream, layer_kwargs, batch_size, device)
    finally:
        handle.remove()
    return torch.cat(residuals), torch.cat(inputs)


def advance_from_block(layer: nn.Module, adapter: MoEAdapter, residual: torch.Tensor, block_input: torch.Tensor,
                       batch_size: int, device: torch.device) -> torch.Tensor:
    """The layer's output for every sequence from `capture_block_input`'s residual and block input, in the
    stream's batches (the block sees the same batches as in `run_layer`, so the result is the same bit for bit).
    Written into `residual`'s storage, batch by batch, so the new stream costs no second stream-sized buffer."""
    seq = residual.shape[1]
    with torch.no_grad():
        for start in range(0, residual.shape[0], batch_size):
            batch = residual[start:start + batch_size].to(device)
            x = block_input[start * seq:(start + batch.shape[0]) * seq].reshape(batch.shape)
            residual[start:start + batch.shape[0]] = adapter.layer_output(layer, batch, x).to(residual.device)
    return residual


def _expert_token_chunks(expert_input: torch.Tensor, token_index: torch.Tensor | None,
                         widest: int) -> Iterator[torch.Tensor]:
    """The rows of `expert_input` that `token_index` selects (all rows when None), a bounded chunk at a time:
    an expert's token matrix and its [tokens, intermediate] down-projection input are never built whole."""
    rows = max(1, GPTQ.max_chunk_bytes // (4 * widest))
    n = expert_input.shape[0] if token_index is None else token_index.numel()
    for start in range(0, n, rows):
        yield (expert_input[start:start + rows] if token_index is None
               else expert_input[token_index[start:start + rows]])


def _weighted_chunks(expert_input: torch.Tensor, token_index: torch.Tensor | None, widest: int,
                     row_weights: torch.Tensor | None, fp_inputs: FPExpertInputs | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """`_expert_token_chunks` with each chunk's slice of `row_weights` (one weight per selected row, or None) and
    the FP stream's rows of the same tokens (None without `fp_inputs`)."""
    start = 0
    for x in _expert_token_chunks(expert_input, token_index, widest):
        stop = start + x.shape[0]
        yield (x, None if row_weights is None else row_weights[start:stop],
               None if fp_inputs is None else fp_inputs.rows(token_index, start, stop))
        start = stop


def _add_rows(solver, x: torch.Tensor, weights: torch.Tensor | None, x_fp: torch.Tensor | None) -> None:
    """Rows sqrt(w) x into a GPTQ solver, or (sqrt(w) x, sqrt(w) x_fp) into an AsymmetricGPTQ (gptq_target.py)."""
    if x_fp is None:
        solver.add_batch(weighted_rows(x, weights))
    else:
        solver.add_batch(weighted_rows(x, weights), weighted_rows(x_fp, weights))


def collect_hessians(group: list[tuple[str, nn.Linear]], run_batches: Callable[[], None],
                     row_weights: Callable[[], torch.Tensor | None] | None = None) -> dict[str, GPTQ]:
    """The GPTQ accumulator of one group of Linears that share an input (attention's q, k and v; a gate and up
    projection), filled by running `run_batches` (which may raise _StopForward per batch: the pass stops once
    every Linear of the group has fired). One Hessian serves the whole group (and so one factorisation); each
    Linear's hook checks it sees the same input as the first. `row_weights`, when given, returns the weight of
    each row of the batch being run (None: unweighted); a row then enters the Hessian as sqrt(w) x (see
    expert_hessian.py). Returns the solver under every name of the group."""
    first = group[0][1]
    solver = GPTQ(first.in_features, device=first.weight.device)
    batch_input: list[torch.Tensor] = []  # the input of the batch being run, as the first Linear saw it
    fired: set[str] = set()
    handles = []
    for name, linear in group:
        def hook(_module, args, _output, name=name):
            x = args[0]
            if not fired:
                batch_input[:] = [x]
                x = x.detach()
                solver.add_batch(x if row_weights is None else weighted_rows(x.reshape(-1, x.shape[-1]), row_weights()))
            elif x is not batch_input[0] and not torch.equal(x, batch_input[0]):
                raise RuntimeError(f"{name} does not see the same input as {group[0][0]}: the adapter groups "
                                   "Linears with different inputs")
            fired.add(name)
            if len(fired) == len(group):
                fired.clear()
                batch_input.clear()
                raise _StopForward
        handles.append(linear.register_forward_hook(hook))
    try:
        run_batches()
    finally:
        for h in handles:
            h.remove()
    return {name: solver for name, _ in group}


class LayerwiseQuantizer:
    """Runs QESC (or plain GPTQ / RTN) over a model's decoder layers; see the module docstring."""

    # rows of one GPTQ column loop (quant.gptq.GPTQ_LOOP_ROWS); 1 quantizes one matrix at a time (same results)
    loop_rows: int = GPTQ_LOOP_ROWS

    def __init__(self, model: nn.Module, config: QuantizeConfig, device: torch.device | str = "cpu",
                 progress_dir: Path | None = None, layer_source: LayerSource | None = None,
                 model_fingerprint: str | None = None):
        """`model` may be a skeleton whose decoder layers are on the meta device when `layer_source` reads them
        lazily; then `progress_dir` is required (the quantized layers are kept there, not in memory).
        `model_fingerprint` (from `weight_scan.scan_weights`) identifies the model in the progress; when not given
        it is computed on first need, with one pass over the weights."""
        self.model = model
        self.config = config
        self.device = torch.device(device)
        self.adapter = get_adapter(model)
        self.layers = self.adapter.decoder_layers(model)  # shapes only, when lazy
        self.source = layer_source if layer_source is not None else ModelLayers(self.layers)
        self.progress_dir = progress_dir
        self._model_fingerprint = model_fingerprint
        if len(config.expert_bits) != len(self.layers):
            raise ValueError(f"{len(config.expert_bits)} expert bit widths for {len(self.layers)} layers")
        if not self.source.in_memory and progress_dir is None:
            raise ValueError("a lazy layer source needs a progress directory to keep the quantized layers in")
        # Quantized matrices of the layers in memory (all of them with ModelLayers, none between layers when lazy);
        # their shapes are kept for every layer.
        self.quantized: dict[str, QuantizedWeight] = {}
        self.quantized_shapes: dict[str, QuantizedShape] = {}
        self.reports: list[LayerReport] = []

    # -- quantized matrices ---------------------------------------------------------------------------
    def _record(self, name: str, qw: QuantizedWeight, loss: float | None, report: LayerReport,
                dtype: torch.dtype) -> torch.Tensor:
        """Keep the quantized matrix `name` for the export; returns its dequantized weight in `dtype`."""
        if loss is not None:
            report.gptq_loss[name] = float(loss)
        # the codes leave the compute device as soon as they exist: in memory (--no-lazy) every layer's codes are
        # kept until the export, which on a GPU would add up to the whole quantized model (~45 GB for Mixtral-8x7B)
        self.quantized[name] = qw.to("cpu")
        self.quantized_shapes[name] = QuantizedShape(*qw.codes.shape, qw.bits, qw.group_size)
        return qw.dequantize().to(dtype)

    def _quantize_matrices(self, items: list[tuple[str, torch.Tensor, GPTQ | None]], bits: int,
                           report: LayerReport) -> list[torch.Tensor]:
        """Quantize (name, FP weight, solver) items, GPTQ with the solver or round-to-nearest when it is None (or
        the method is rtn); returns their dequantized weights in order.

        Consecutive matrices of one solver are stacked by rows and consecutive solvers of equal shapes share one
        column loop (`quant.gptq.column_loops`) while it stays small: there Python dispatch, not arithmetic,
        bounds GPTQ, and the result is the same bit for bit as one matrix at a time."""
        spec = self.config.spec(bits)
        out: list[torch.Tensor | None] = [None] * len(items)
        gptq_items = []
        for i, (name, weight, solver) in enumerate(items):
            if solver is None or self.config.method == "rtn":
                out[i] = self._record(name, rtn_quantize(weight, spec), None, report, weight.dtype)
            else:
                gptq_items.append(i)
        # what each solver's column loop quantizes: a GPTQ solver its weight, an asymmetric one (--gptq-target) its
        # FP target, on its inner GPTQ solver (quant/asymmetric.py)
        loop_inputs = {i: items[i][2].loop_input(items[i][1], spec) for i in gptq_items}
        for loop in column_loops([(loop_inputs[i][0], items[i][1].shape) for i in gptq_items], self.loop_rows):
            chosen = [gptq_items[k] for k in loop]
            results = quantize_together([loop_inputs[i][0] for i in chosen], [loop_inputs[i][1] for i in chosen], spec)
            for i, result in zip(chosen, results):
                name, weight, _solver = items[i]
                out[i] = self._record(name, result.qweight, result.loss, report, weight.dtype)
        return out

    def _quantize_linear_groups(self, prefix: str, groups: list[list[tuple[str, nn.Linear]]], bits: int,
                                run_batches: Callable[[], None], report: LayerReport,
                                row_weights: Callable[[], torch.Tensor | None] | None = None) -> None:
        """GPTQ on Linears group by group (true-sequential: a group's inputs come from the quantized groups
        before it)."""
        for group in groups:
            solvers = {} if self.config.method == "rtn" else collect_hessians(group, run_batches, row_weights)
            dequantized = self._quantize_matrices([(f"{prefix}.{name}", linear.weight.data, solvers.get(name))
                                                   for name, linear in group], bits, report)
            for (_name, linear), weight in zip(group, dequantized):
                linear.weight.data = weight

    # -- routed experts -------------------------------------------------------------------------------
    def _quantize_routed_experts(self, prefix: str, block: nn.Module, expert_input: torch.Tensor,
                                 routing: Routing, report: LayerReport, fp_inputs: FPExpertInputs | None = None) -> None:
        """GPTQ of every routed expert on the tokens routed to it. The gate and up projections share their input
        (one solver, stacked rows); the down projection's input is computed with the expert's quantized gate and
        up. Experts go through the solver a few at a time (as many as one small column loop takes: see
        `_quantize_matrices`), so at most that many experts' Hessians exist at once. With `fp_inputs`, each fits
        the FP expert's output on the FP stream's rows of the same tokens (--gptq-target, gptq_target.py)."""
        adapter, cfg = self.adapter, self.config
        hessian = get_expert_hessian(cfg.expert_hessian)
        act = adapter.expert_act(block)
        num_experts = adapter.num_experts(block)
        report.expert_tokens = []
        names = [{k: f"{prefix}.experts.{e}.{k}" for k in ("gate_proj", "up_proj", "down_proj")}
                 for e in range(num_experts)]
        pending = []  # (expert, its weights, token index, row weights, width) of the experts quantized with GPTQ
        policy = get_sparse_expert_policy(cfg.sparse_expert_policy)  # sparse_experts.py: what a starved expert gets
        layer_routing = LayerRouting(routing, expert_input.shape[0], hessian, cfg.min_expert_tokens,
                                     lambda: adapter.expert_probabilities(block, routing.logits))
        for e in range(num_experts):
            token_index = (routing.indices == e).any(dim=-1).nonzero().squeeze(-1)
            report.expert_tokens.append(int(token_index.numel()))
            weights = adapter.expert_weights(block, e)
            use_rtn, row_weights = cfg.method == "rtn", None
            if not use_rtn:  # RTN or which rows (None: all) with which Hessian row weights (None: unweighted)
                chosen = policy.select(e, token_index, weights["gate_proj"].shape[1], layer_routing)
                report.sparse_experts += [e] if chosen.sparse else []
                use_rtn, token_index, row_weights = chosen.rtn, chosen.token_index, chosen.row_weights
            expert_bits = cfg.expert_bits_for(report.layer, e)  # per-module schedules: this expert's own width
            if use_rtn:
                gate_q, up_q, down_q = self._quantize_matrices(
                    [(names[e][k], weights[k], None) for k in ("gate_proj", "up_proj", "down_proj")], expert_bits,
                    report)
                adapter.set_expert_weights(block, e, {"gate_proj": gate_q, "up_proj": up_q, "down_proj": down_q})
            else:
                pending.append((e, weights, token_index, row_weights, expert_bits))
        if not pending:
            return
        shapes = pending[0][1]
        per_batch = max(1, self.loop_rows // min(shapes["gate_proj"].shape[0] + shapes["up_proj"].shape[0],
                                                 shapes["down_proj"].shape[0]))
        # a batch shares one width (one column loop, one grid): experts of equal width are batched together
        batches = [[p for p in pending if p[4] == width] for width in dict.fromkeys(p[4] for p in pending)]
        batches = [group[i:i + per_batch] for group in batches for i in range(0, len(group), per_batch)]
        for batch in batches:
            bits = batch[0][4]
            solvers = []
            new_solver = GPTQ if fp_inputs is None else fp_inputs.solver
            for _e, weights, token_index, row_weights, _b in batch:
                solver = new_solver(weights["gate_proj"].shape[1], device=expert_input.device)
                for x, w, x_fp in _weighted_chunks(expert_input, token_index, max(weights["gate_proj"].shape),
                                                   row_weights, fp_inputs):
                    _add_rows(solver, x, w, x_fp)
                solvers.append(solver)
            gate_up = self._quantize_matrices(
                [(names[e][k], weights[k], solver) for (e, weights, _t, _w, _b), solver in zip(batch, solvers)
                 for k in ("gate_proj", "up_proj")], bits, report)
            del solvers
            down_solvers = []
            for (_e, weights, token_index, row_weights, _b), gate_q, up_q in zip(batch, gate_up[0::2], gate_up[1::2]):
                down_solver = new_solver(weights["down_proj"].shape[1], device=expert_input.device)
                with torch.no_grad():  # the down projection's input, from the quantized gate and up, chunk by chunk
                    for x, w, x_fp in _weighted_chunks(expert_input, token_index, max(weights["gate_proj"].shape),
                                                       row_weights, fp_inputs):
                        _add_rows(down_solver, act(x.to(gate_q.dtype) @ gate_q.T) * (x.to(up_q.dtype) @ up_q.T), w,
                                  None if x_fp is None else fp_inputs.down_input(x_fp, weights["gate_proj"],
                                                                                 weights["up_proj"]))
                down_solvers.append(down_solver)
            downs = self._quantize_matrices(
                [(names[e][k], weights[k], solver) for (e, weights, _t, _w, _b), solver in zip(batch, down_solvers)
                 for k in ("down_proj",)], bits, report)
            for (e, _weights, _t, _w, _b), gate_q, up_q, down_q in zip(batch, gate_up[0::2], gate_up[1::2], downs):
                adapter.set_expert_weights(block, e, {"gate_proj": gate_q, "up_proj": up_q, "down_proj": down_q})

    # -- one decoder layer ----------------------------------------------------------------------------
    def quantize_layer(self, index: int, fp_stream: torch.Tensor | None, q_stream: torch.Tensor | None,
                       layer_kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, LayerReport, nn.Module]:
        """Quantize decoder layer `index` (from the layer source) and advance both streams through it; returns the
        streams, the report and the quantized layer (on CPU, not yet released to the source)."""
        cfg, adapter, device = self.config, self.adapter, self.device
        layer = self.source.load(index).to(device)
        report = LayerReport(layer=index, expert_bits=cfg.expert_bits[index])
        needs_data = cfg.method != "rtn"
        needs_fp = cfg.method in ("qesc", "qesc-mse")
        fp_layer = copy.deepcopy(layer) if needs_fp else None
        fp_seconds = 0.0
        prefix = f"layers.{index}"

        def run_stream():
            run_until_stopped(layer, q_stream, layer_kwargs, cfg.batch_size, device)

        t0 = time.perf_counter()
        if cfg.attn_bits is not None:
            self._quantize_linear_groups(prefix, adapter.attention_linears(layer), cfg.attn_bits, run_stream, report)
        report.seconds["attention"] = time.perf_counter() - t0

        block = adapter.moe_block(layer)
        if block is None:  # a dense layer (e.g. DeepSeek's first layers): its MLP is quantized like the experts
            t0 = time.perf_counter()
            self._quantize_linear_groups(prefix, adapter.dense_mlp_linears(layer), cfg.expert_bits[index],
                                         run_stream, report)
            report.seconds["mlp"] = time.perf_counter() - t0
        else:
            block_prefix = f"{prefix}.mlp"
            expert_input = residual = None
            if needs_data:  # the block input, and the residual that the stream's advance adds the block's output to
                residual, expert_input = capture_block_input(layer, adapter, q_stream, layer_kwargs, cfg.batch_size,
                                                             device)
            t0 = time.perf_counter()
            fp_experts = None  # the FP stream's block input, for --gptq-target fp (gptq_target.py)
            if needs_fp:
                residual_fp, router_input_fp = capture_block_input(fp_layer, adapter, fp_stream, layer_kwargs,
                                                                   cfg.batch_size, device)
                num_experts = adapter.num_experts(block)
                topk = num_experts if cfg.method == "qesc-mse" else (cfg.router_topk or adapter.default_calibration_topk(block))
                router_weight = adapter.router_weight(block)
                result = calibrate_router(
                    router_weight.data, adapter.router_input(block, router_input_fp), adapter.router_input(block, expert_input),
                    RouterCalibrationConfig(topk=min(topk, num_experts), steps=cfg.router_steps, lr=cfg.router_lr,
                                            solver=cfg.router_solver, seed=cfg.seed + index),
                    selection_scores=lambda logits: adapter.selection_scores(block, logits))
                router_weight.data.copy_(result.weight)
                report.router = {"topk": min(topk, num_experts), "loss_before": result.loss_before,
                                 "loss_after": result.loss_after, "best_step": result.best_step}
                fp_experts = fp_expert_inputs(cfg.gptq_target, router_input_fp, adapter.expert_act(block))
            report.seconds["router"] = time.perf_counter() - t0
            if needs_fp:  # the FP copy's last use: advance its stream now, so it is freed before the experts
                t0 = time.perf_counter()
                fp_stream = advance_from_block(fp_layer, adapter, residual_fp, router_input_fp, cfg.batch_size,
                                               device)
                fp_layer = residual_fp = router_input_fp = None
                fp_seconds = time.perf_counter() - t0

            t0 = time.perf_counter()
            shared_groups = adapter.shared_experts(block)
            if shared_groups:
                hessian = get_expert_hessian(cfg.expert_hessian)
                batch_weights: list[torch.Tensor | None] = [None]  # the rows' weights of the batch being run

                def run_block():  # the shared expert alone (adapter.shared_output), not the routed ones
                    for start in range(0, expert_input.shape[0], cfg.batch_size * 512):
                        hidden = expert_input[start:start + cfg.batch_size * 512]
                        try:
                            with torch.no_grad():
                                batch_weights[0] = hessian.shared_weights(adapter, block, hidden)
                                adapter.shared_output(block, hidden)
                        except _StopForward:
                            pass
                self._quantize_linear_groups(prefix, shared_groups, cfg.expert_bits[index], run_block, report,
                                             row_weights=lambda: batch_weights[0])
            with torch.no_grad():
                if needs_data:
                    routing = adapter.route(block, expert_input)
                    self._quantize_routed_experts(block_prefix, block, expert_input, routing, report, fp_experts)
                else:
                    dummy = Routing(logits=None, weights=None, indices=torch.empty(0, 1, dtype=torch.long))
                    self._quantize_routed_experts(block_prefix, block, torch.empty(0, 0), dummy, report)
            report.seconds["experts"] = time.perf_counter() - t0
            fp_experts = None

        t0 = time.perf_counter()
        if block is not None and needs_data:  # attention is final: only the quantized block has to run
            q_stream = advance_from_block(layer, adapter, residual, expert_input, cfg.batch_size, device)
            residual = expert_input = None
        elif needs_data:
            q_stream = run_layer(layer, q_stream, layer_kwargs, cfg.batch_size, device)
        if fp_layer is not None:  # a dense layer (no router): the FP stream advances here
            fp_stream = run_layer(fp_layer, fp_stream, layer_kwargs, cfg.batch_size, device)
            fp_layer = None
        report.seconds["advance"] = time.perf_counter() - t0 + fp_seconds
        return fp_stream, q_stream, report, layer.to("cpu")

    # -- progress (resume) ----------------------------------------------------------------------------
    def model_fingerprint(self) -> str:
        if self._model_fingerprint is None:
            self._model_fingerprint = scan_weights(self.model, self.source).fingerprint
        return self._model_fingerprint

    def resumable_layers(self, calib_ids: torch.Tensor) -> int:
        """Layers done in the progress directory that this run can continue from (0: none); raises
        ProgressMismatchError when the progress belongs to another model, other settings or calibration tokens."""
        state = read_progress_state(self.progress_dir) if self.progress_dir is not None else None
        if state is None:
            return 0
        self._check_progress(state, self.config.fingerprint(calib_ids, self.model_fingerprint()))
        return state["completed_layers"]

    def _check_progress(self, state: dict, fingerprint: dict) -> None:
        problem = progress_mismatch(state.get("fingerprint"), fingerprint)
        if problem:
            raise ProgressMismatchError(f"cannot resume from {self.progress_dir}: {problem}")

    def _layer_quantized(self, index: int) -> dict[str, QuantizedWeight]:
        return {n: qw for n, qw in self.quantized.items() if n.startswith(f"layers.{index}.")}

    def _save_progress(self, index: int, layer: nn.Module, fp_stream, q_stream, fingerprint: dict) -> None:
        """Write layer `index`'s quantized tensors and the streams; state.json is replaced last and atomically,
        so a crash at any point leaves the previous consistent state."""
        d = self.progress_dir
        d.mkdir(parents=True, exist_ok=True)
        layer_tensors = {f"state.{k}": v.contiguous() for k, v in layer.state_dict().items()}
        layer_tensors.update({f"quant.{k}": v for k, v in quantized_tensors(self._layer_quantized(index)).items()})
        save_file(layer_tensors, progress_layer_file(d, index))
        streams = {k: v.contiguous() for k, v in (("fp", fp_stream), ("q", q_stream)) if v is not None}
        save_file(streams, d / "streams.tmp.safetensors")
        os.replace(d / "streams.tmp.safetensors", d / f"streams_{index:04d}.safetensors")
        state = {"fingerprint": fingerprint, "completed_layers": index + 1, "threads": torch.get_num_threads(),
                 "reports": [asdict(r) for r in self.reports]}
        (d / "state.tmp.json").write_text(json.dumps(state))
        os.replace(d / "state.tmp.json", d / "state.json")
        old = d / f"streams_{index - 1:04d}.safetensors"
        if old.exists():
            old.unlink()

    def _load_progress(self, fingerprint: dict):
        d = self.progress_dir
        state = read_progress_state(d)
        self._check_progress(state, fingerprint)
        if state.get("threads") != torch.get_num_threads():  # sums split over other threads round differently
            log.warning("the progress in %s was computed with %s torch threads, this run uses %d: the result can "
                        "differ in the last digits from an uninterrupted run", d, state.get("threads"),
                        torch.get_num_threads())
        done = state["completed_layers"]
        for index in range(done):
            layer_state, quant = read_progress_layer(d, index)
            quantized = quantized_from_tensors(quant)
            self.quantized_shapes.update({n: QuantizedShape(*qw.codes.shape, qw.bits, qw.group_size)
                                          for n, qw in quantized.items()})
            if self.source.in_memory:  # lazily loaded layers stay in the progress directory
                self.layers[index].load_state_dict(layer_state)
                self.quantized.update(quantized)
            del layer_state, quant, quantized
        self.reports = [LayerReport(**r) for r in state["reports"]]
        streams = load_file(d / f"streams_{done - 1:04d}.safetensors")
        log.info("resuming after layer %d of %d", done, len(self.layers))
        return done, streams.get("fp"), streams.get("q")

    # -- the whole model ------------------------------------------------------------------------------
    def run(self, calib_ids: torch.Tensor, resume: bool = False,
            stop_after_layer: int | None = None) -> list[LayerReport]:
        """Quantize every decoder layer in order. `stop_after_layer` ends the run early (for tests of resume)."""
        cfg = self.config
        fingerprint = cfg.fingerprint(calib_ids, self.model_fingerprint()) if self.progress_dir is not None else None
        start, fp_stream, q_stream = 0, None, None
        if resume and self.progress_dir is not None and (self.progress_dir / "state.json").exists():
            start, fp_stream, q_stream = self._load_progress(fingerprint)
        elif self.progress_dir is not None and self.progress_dir.exists():
            state = read_progress_state(self.progress_dir)
            if state is not None:
                log.warning("discarding the progress of %d of %d layers in %s (resume=False)",
                            state["completed_layers"], len(self.layers), self.progress_dir)
            shutil.rmtree(self.progress_dir)
        layer_kwargs = {}
        if cfg.method != "rtn":
            inputs, layer_kwargs = capture_layer_inputs(self.model, self.adapter, calib_ids, cfg.batch_size, self.device)
            if start == 0:
                q_stream = inputs
                fp_stream = inputs.clone() if cfg.method in ("qesc", "qesc-mse") else None
            del inputs
        for index in tqdm(range(start, len(self.layers)), desc=f"{cfg.method} layers", unit="layer",
                          initial=start, total=len(self.layers)):
            fp_stream, q_stream, report, layer = self.quantize_layer(index, fp_stream, q_stream, layer_kwargs)
            self.reports.append(report)
            log.info("layer %d: %s%s", index, {k: round(v, 2) for k, v in report.seconds.items()},
                     f" router TopK-MSE {report.router['loss_before']:.4g} -> {report.router['loss_after']:.4g}"
                     if report.router else "")
            if report.sparse_experts:
                log.info("layer %d: %d experts under the token threshold (%s policy): %s", index,
                         len(report.sparse_experts), cfg.sparse_expert_policy, report.sparse_experts)
            if self.progress_dir is not None:
                self._save_progress(index, layer, fp_stream, q_stream, fingerprint)
            self.source.release(index, layer)
            if not self.source.in_memory:  # the progress file holds them now
                for name in self._layer_quantized(index):
                    del self.quantized[name]
            del layer
            if stop_after_layer is not None and index >= stop_after_layer:
                break
        return self.reports
