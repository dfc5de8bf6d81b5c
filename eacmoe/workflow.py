"""End-to-end quantization job: load, calibrate, quantize layer by layer, evaluate, write the output directory.

`python -m eacmoe.quantize` parses its flags into a `QuantizeJob` and calls `run_job`. The output directory
appears only when complete: everything is written into `<out>.partial/` (which also holds the per-layer
progress used by --resume) and renamed to `<out>` at the very end.

Models larger than `LAZY_AUTO_BYTES` in memory (or any model with --lazy) are never materialised whole: decoder
layers are read from the checkpoint one at a time (`lazy_loading`), quantized layers are kept in the progress
directory, evaluation reads both one layer at a time and the output is written layer by layer.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .adapters import get_adapter
from .assets import resolve_model
from .calibration import get_calibration_data
from .expert_shift import measure_expert_shift
from .heldout import heldout_sequences
from .lazy_loading import (
    CheckpointLayers,
    LayerLoader,
    NonFiniteWeightsError,
    StoredLayers,
    as_torch_dtype,
    estimate_model_bytes,
    save_pretrained_layerwise,
)
from .export import EXPORT_FORMATS, LayerToExport, export_model, in_memory_layers, layer_quantized, non_layer_state
from .pipeline import LayerwiseQuantizer, QuantizeConfig, read_progress_layer
from .quant.serialize import quantized_from_tensors
from .schedule import BitsAccount, parse_expert_bits

log = logging.getLogger(__name__)

# Above this many bytes in memory (at the compute dtype) a model is loaded lazily unless --no-lazy is given: the
# in-memory path holds the model twice (quantized + FP reference for the evaluation).
LAZY_AUTO_BYTES = 2 * 1024**3


class JobError(ValueError):
    """A bad input to the quantization job; the message is meant for the user, one line."""


@dataclass
class QuantizeJob:
    model: str = "tiny-mixtral"
    bits: str = "2"
    method: str = "qesc"
    attn_bits: int | None = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    calib: str = "bundled"
    nsamples: int = 128
    seqlen: int | None = None         # None: the model's context, at most 2048 (the paper's length)
    router_topk: int | None = None
    router_steps: int = 1000
    router_lr: float = 1e-3
    router_solver: str = "adam"
    sparse_expert_policy: str = "pool"
    eval_samples: int = 32
    eval_seqlen: int | None = None    # None: the model's context, at most 512
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    lazy: bool | None = None     # None: lazy when the model is larger than LAZY_AUTO_BYTES in memory
    format: str = "packed"       # packed | gptq | dequantized, see eacmoe.export


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise JobError(f"--device {name} asked for but no CUDA GPU is available")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """float32 on CPU for "auto" (half-precision CPU matmuls lose accuracy); on GPU the checkpoint's dtype."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    return torch.float32 if device.type == "cpu" else "auto"


def check_writable(out: Path) -> None:
    """The nearest existing ancestor of `out` must be a writable directory."""
    parent = out.parent.resolve()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise JobError(f"cannot write to {out}: {parent} is not a writable directory")


def load_config(name_or_path: str):
    path = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    get_adapter(config)  # unsupported families fail before any weight is read
    return config


def use_lazy_loading(requested: bool | None, config, dtype: torch.dtype | str) -> bool:
    """--lazy / --no-lazy as given; otherwise lazy when the whole model would not comfortably fit in memory."""
    if requested is not None:
        return requested
    size = estimate_model_bytes(config, as_torch_dtype(dtype, config))
    lazy = size > LAZY_AUTO_BYTES
    log.info("model takes %.2f GB in memory: %s", size / 1e9,
             "lazy loading (one decoder layer at a time)" if lazy else "loaded whole")
    return lazy


def load_model(name_or_path: str, dtype: torch.dtype | str):
    """Model on CPU (layers move to the device one at a time), eager experts (fast on CPU, exact everywhere)."""
    path = resolve_model(name_or_path)
    load_config(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def check_weights(model) -> None:
    """Refuse NaN / Inf weights (lazily loaded layers are on meta here; the loader checks them as it reads them)."""
    for name, p in model.named_parameters():
        if not p.is_meta and not torch.isfinite(p).all():
            raise JobError(f"weight {name} holds NaN or Inf values; refusing to quantize")


def check_group_size(quantizer: LayerwiseQuantizer, group_size: int) -> None:
    if group_size == -1:
        return
    if group_size <= 0:
        raise JobError(f"--group-size must be a positive divisor of the input widths or -1 (got {group_size})")
    adapter = quantizer.adapter
    widths = set()
    for layer in quantizer.layers:
        for group in adapter.attention_linears(layer) + adapter.dense_mlp_linears(layer):
            widths.update(lin.in_features for _, lin in group)
        block = adapter.moe_block(layer)
        if block is not None:
            widths.update(w.shape[1] for w in adapter.expert_weights(block, 0).values())
            for group in adapter.shared_experts(block):
                widths.update(lin.in_features for _, lin in group)
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        raise JobError(f"--group-size {group_size} does not divide the input width(s) {bad} of this model; "
                       f"use a divisor of {math.gcd(*widths)} or -1 (per channel)")


def bits_account(quantizer: LayerwiseQuantizer) -> BitsAccount:
    account = BitsAccount()
    for shape in quantizer.quantized_shapes.values():
        account.add_quantized(shape.rows, shape.columns, shape.bits, shape.group_size)
    total = sum(p.numel() for p in quantizer.model.parameters())
    account.fp_params = total - account.quantized_params
    return account


def export_metadata(job: QuantizeJob, qconfig: QuantizeConfig, account: BitsAccount) -> dict:
    """What config.json records about how the checkpoint was made (nothing run-specific such as paths)."""
    return {
        "tool": "eacmoe", "source_model": job.model, "method": job.method, "expert_bits": list(qconfig.expert_bits),
        "attn_bits": job.attn_bits, "group_size": job.group_size, "sym": job.sym, "act_order": job.act_order,
        "scale_dtype": "float16", "average_bits_paper": account.paper_average_bits,
        "average_bits_true": account.true_average_bits,
        "calibration": {"source": job.calib, "nsamples": job.nsamples, "seqlen": job.seqlen, "seed": job.seed},
        "router_calibration": ({"loss": "topk-mse" if job.method == "qesc" else "mse", "topk": job.router_topk,
                                "solver": job.router_solver, "max_steps": job.router_steps, "lr": job.router_lr}
                               if job.method in ("qesc", "qesc-mse") else None),
        "sparse_expert_policy": job.sparse_expert_policy,
    }


def write_checkpoint(job: QuantizeJob, partial: Path, model, tokenizer, quantizer: LayerwiseQuantizer,
                     loader: LayerLoader | None, metadata: dict, storage_dtype: torch.dtype) -> None:
    """The output checkpoint in `job.format`; layer by layer from the progress files when lazily loaded."""
    progress_dir = partial / ".progress"
    if job.format == "dequantized":
        if loader is not None:
            def read_state(i):
                return {k: _as_dtype(v, storage_dtype) for k, v in read_progress_layer(progress_dir, i)[0].items()}
            save_pretrained_layerwise(loader, read_state, partial)
        else:
            model.to(storage_dtype).save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        return
    def from_progress():
        for i in range(loader.num_layers):
            state, quant = read_progress_layer(progress_dir, i)
            yield LayerToExport(i, loader.load_state(i, state), layer_quantized(quantized_from_tensors(quant), i))

    layers = from_progress() if loader is not None else in_memory_layers(model, quantizer.quantized)
    export_model(partial, job.format, model, layers, non_layer_state(model), tokenizer, metadata, storage_dtype)


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def run_job(job: QuantizeJob) -> dict:
    """Run the whole job; returns the report (also written to <out>/report.json)."""
    t_start = time.perf_counter()
    device = pick_device(job.device)
    out = Path(job.out) if job.out else Path("out") / f"{Path(resolve_model(job.model)).name}-{job.method}-w{job.bits}"
    partial = out.with_name(out.name + ".partial")
    if job.format not in EXPORT_FORMATS:
        raise JobError(f"--format must be one of {', '.join(EXPORT_FORMATS)} (got {job.format!r})")
    if out.exists() and not job.overwrite:
        raise JobError(f"output directory {out} already exists; pass --overwrite to replace it")
    check_writable(out)

    # Everything that can be wrong with the input is checked before anything is written.
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source_config = load_config(job.model)
    storage_dtype = as_torch_dtype(None, source_config)  # the checkpoint's own dtype, for what stays unquantized
    lazy = use_lazy_loading(job.lazy, source_config, pick_dtype(job.dtype, device))
    loader = None
    if lazy:
        try:
            loader = LayerLoader(resolve_model(job.model), pick_dtype(job.dtype, device))
        except (OSError, ValueError) as exc:
            raise JobError(f"cannot load model {job.model!r} lazily: {str(exc).splitlines()[0]}") from exc
        model, tokenizer = loader.model, AutoTokenizer.from_pretrained(loader.directory)
    else:
        model, tokenizer = load_model(job.model, pick_dtype(job.dtype, device))
    check_weights(model)
    num_layers = len(get_adapter(model).decoder_layers(model))
    expert_bits = parse_expert_bits(job.bits, num_layers)
    if job.attn_bits is not None and job.attn_bits not in (2, 3, 4, 8):
        raise JobError(f"--attn-bits must be 2, 3, 4, 8 or 16 (got {job.attn_bits})")
    qconfig = QuantizeConfig(expert_bits=expert_bits, method=job.method, attn_bits=job.attn_bits,
                             group_size=job.group_size, sym=job.sym, act_order=job.act_order,
                             router_topk=job.router_topk, router_steps=job.router_steps, router_lr=job.router_lr,
                             router_solver=job.router_solver,
                             sparse_expert_policy=job.sparse_expert_policy, seed=job.seed)
    progress_dir = partial / ".progress"
    quantizer = LayerwiseQuantizer(model, qconfig, device=device, progress_dir=progress_dir,
                                   layer_source=CheckpointLayers(loader) if lazy else None)
    check_group_size(quantizer, job.group_size)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    job.seqlen = job.seqlen or min(2048, context)
    job.eval_seqlen = job.eval_seqlen or min(512, context)
    calib_ids = get_calibration_data(job.calib, tokenizer, job.nsamples, job.seqlen, seed=job.seed)
    dtype = next(model.parameters()).dtype
    timings["load"] = time.perf_counter() - t0

    if not job.resume and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    # The FP reference for evaluation: a second copy read before any weight changes, or, when lazy, the checkpoint
    # itself read again layer by layer (the skeleton's embedding, norm and head are never quantized).
    if lazy:
        quantized_layers = StoredLayers(loader, lambda i: read_progress_layer(progress_dir, i)[0])
        fp_model, eval_sources = model, {"fp_layers": CheckpointLayers(loader), "q_layers": quantized_layers}
    else:
        fp_model, eval_sources = load_model(job.model, dtype)[0], {}
    t0 = time.perf_counter()
    try:
        layer_reports = quantizer.run(calib_ids, resume=job.resume)
    except NonFiniteWeightsError as exc:
        raise JobError(str(exc)) from exc
    timings["quantize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    evaluation = {}
    for source in ("bundled-test", "wikitext2"):
        ids = heldout_sequences(source, tokenizer, job.eval_samples, job.eval_seqlen)
        if ids is None:
            log.warning("held-out source %s is not available; skipped", source)
            continue
        evaluation[source] = measure_expert_shift(fp_model, model, ids, batch_size=qconfig.batch_size,
                                                  device=device, **eval_sources).to_dict()
    timings["evaluate"] = time.perf_counter() - t0

    account = bits_account(quantizer)
    t0 = time.perf_counter()
    write_checkpoint(job, partial, model, tokenizer, quantizer, loader if lazy else None,
                     export_metadata(job, qconfig, account), storage_dtype)
    timings["save"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    seconds_by_stage: dict[str, float] = {}
    for r in layer_reports:
        for k, v in r.seconds.items():
            seconds_by_stage[k] = seconds_by_stage.get(k, 0.0) + v
    report = {
        "model": job.model, "job": asdict(job), "lazy_loading": lazy, "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "format": job.format, "expert_bits": expert_bits, "average_bits_paper": account.paper_average_bits,
        "average_bits_true": account.true_average_bits, "size_bytes": account.size_bytes,
        "evaluation": evaluation, "timings_seconds": timings, "layer_seconds_by_stage": seconds_by_stage,
        "layers": [asdict(r) for r in layer_reports],
    }
    (partial / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    try:
        from .report import plot_report

        plot_report(report, partial / "report.png")
    except Exception as exc:  # a plot must never cost the user a finished quantization
        log.warning("could not draw report.png: %s", exc)
    shutil.rmtree(partial / ".progress", ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    report["out"] = str(out)
    return report
