"""End-to-end quantization job: load, calibrate, quantize layer by layer, evaluate, write the output directory.

`python -m eacmoe.quantize` parses its flags into a `QuantizeJob` and calls `run_job`. Every input is checked
(`job_checks`), and the calibration and held-out tokens are read, before a weight is read or anything is
written. The output directory appears only when complete: everything is written into `<out>.partial/` (which
also holds the per-layer progress used by --resume) and renamed to `<out>` at the very end; both carry eacmoe's
marker (`output_dir`), and no other directory is ever deleted.

Models larger than `LAZY_AUTO_BYTES` in memory (or any model with --lazy) are never materialised whole: decoder
layers are read from the checkpoint one at a time (`lazy_loading`), quantized layers are kept in the progress
directory, evaluation reads both one layer at a time and the output is written layer by layer.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import output_dir
from .adapters import get_adapter
from .assets import resolve_model
from .bit_allocation import AllocationError, auto_expert_bits, read_sensitivity_file
from .calibration import get_calibration_data
from .cli import one_line
from .expert_shift import measure_expert_shift
from .export import LayerToExport, export_model, in_memory_layers, layer_quantized, non_layer_state
from .heldout import heldout_sequences
from .job_checks import DTYPES, JobError, JobPaths, check_job, check_job_for_model, parse_device
from .lazy_loading import (
    CheckpointLayers,
    LayerLoader,
    StoredLayers,
    as_torch_dtype,
    estimate_model_bytes,
    save_pretrained_layerwise,
)
from .pipeline import (
    LayerReport,
    LayerwiseQuantizer,
    ProgressMismatchError,
    QuantizeConfig,
    read_progress_layer,
    read_progress_state,
)
from .quant.serialize import quantized_from_tensors
from .router_calibration import RouterCalibrationConfig
from .schedule import BitsAccount
from .weight_scan import NonFiniteWeightsError

log = logging.getLogger(__name__)

# Above this many bytes in memory (at the compute dtype) a model is loaded lazily unless --no-lazy is given: the
# in-memory path holds the model twice (quantized + FP reference for the evaluation).
LAZY_AUTO_BYTES = 2 * 1024**3
HELDOUT_SOURCES = ("bundled-test", "wikitext2")


@dataclass
class QuantizeJob:
    model: str = "tiny-mixtral"
    bits: str = "2"
    method: str = "qesc"
    attn_bits: int | None = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    grid: str = "mse"                 # mse | minmax, see quant/grid.py (QuantizeConfig keeps the paper's minmax)
    calib: str = "bundled"
    nsamples: int = 128
    seqlen: int | None = None         # None: the model's context, at most 2048 (the paper's length)
    router_topk: int | None = None
    router_steps: int = 1000
    router_lr: float = 1e-3
    router_solver: str = "adam"
    sparse_expert_policy: str = "pool"  # see sparse_experts.py
    min_expert_tokens: int | None = None  # None: an expert's input width
    expert_hessian: str = "routed"    # routed | weighted, see expert_hessian.py
    gptq_target: str = "quantized"    # quantized | fp | fp:A, see gptq_target.py
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
    threads: int | None = None   # torch CPU threads; None keeps torch's default (recorded either way)
    sensitivity: str | None = None  # sensitivity.json for --bits auto:B (else the in-run proxy)
    per_expert_bits: bool | None = None  # --bits auto:B per routed expert (None: the default, yes) or per layer (False)


def pick_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """float32 on CPU for "auto" (half-precision CPU matmuls lose accuracy); on GPU the checkpoint's dtype."""
    if name != "auto":
        return DTYPES[name]
    return torch.float32 if device.type == "cpu" else "auto"


def load_config(name_or_path: str):
    path = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot load model {name_or_path!r}: {one_line(exc)}") from exc
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
    model.eval().requires_grad_(False)  # nothing here trains the model: no forward can build an autograd graph
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def bits_account(quantizer: LayerwiseQuantizer) -> BitsAccount:
    """The bits of every quantized matrix as it was quantized, by name; attention apart from the expert weights."""
    adapter = quantizer.adapter
    attention = {f"layers.{i}.{name}" for i, layer in enumerate(quantizer.layers)
                 for group in adapter.attention_linears(layer) for name, _ in group}
    account = BitsAccount()
    for name, shape in quantizer.quantized_shapes.items():
        account.add_quantized(shape.rows, shape.columns, shape.bits, shape.group_size, name=name,
                              expert=name not in attention)
    total = sum(p.numel() for p in quantizer.model.parameters())
    account.fp_params = total - account.quantized_params
    return account


def router_topk_used(reports: list[LayerReport]) -> int | list[int] | None:
    """The K each calibrated router was fitted with (one number when all layers agree); None: no calibration."""
    used = [r.router["topk"] for r in reports if r.router]
    return None if not used else used[0] if len(set(used)) == 1 else used


def export_metadata(job: QuantizeJob, qconfig: QuantizeConfig, account: BitsAccount,
                    reports: list[LayerReport]) -> dict:
    """What config.json records about how the checkpoint was made: the settings that took effect (a flag the
    method ignores is not recorded), nothing run-specific such as paths."""
    router = None
    if job.method in ("qesc", "qesc-mse"):
        router = {"loss": "topk-mse" if job.method == "qesc" else "mse", "topk": router_topk_used(reports),
                  "solver": job.router_solver}
        if job.router_solver == "adam":
            router.update(max_steps=job.router_steps, lr=job.router_lr)
        else:
            router["dampings"] = list(RouterCalibrationConfig(topk=1).ridge_dampings)
    uses_data = job.method != "rtn"
    return {
        "tool": "eacmoe", "source_model": job.model, "method": job.method, "expert_bits": list(qconfig.expert_bits),
        "routed_expert_bits": qconfig.routed_expert_bits,
        "attn_bits": job.attn_bits, "group_size": job.group_size, "sym": job.sym,
        "act_order": job.act_order and uses_data, "scale_dtype": "float16",
        "average_bits_paper": account.paper_average_bits, "average_bits_true": account.true_average_bits,
        "calibration": ({"source": job.calib, "nsamples": job.nsamples, "seqlen": job.seqlen, "seed": job.seed}
                        if uses_data else None),
        "router_calibration": router,
        "sparse_expert_policy": job.sparse_expert_policy if uses_data else None,
        "min_expert_tokens": job.min_expert_tokens if uses_data else None,
        "expert_hessian": job.expert_hessian if uses_data else None,
        "gptq_target": job.gptq_target if uses_data else None,
        "grid": job.grid,
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


def load_heldout(tokenizer, nsamples: int, seqlen: int) -> dict[str, torch.Tensor]:
    """The held-out windows of every source readable here, read before any weight (too few windows is a JobError)."""
    heldout = {}
    for source in HELDOUT_SOURCES:
        try:
            ids = heldout_sequences(source, tokenizer, nsamples, seqlen)
        except ValueError as exc:
            raise JobError(f"--eval-samples / --eval-seqlen: {exc}") from exc
        if ids is not None:  # else not available here; heldout_sequences logged why, in one line
            heldout[source] = ids
    return heldout


def prepare_partial(partial: Path, resume: bool, num_layers: int) -> None:
    """`<out>.partial` as this run needs it: kept for --resume; otherwise emptied, saying what progress of an
    earlier run that discards. `job_checks.check_output` has made sure that eacmoe wrote it."""
    state = read_progress_state(partial / ".progress") if partial.is_dir() else None
    if resume and state is None:
        log.warning("--resume: %s holds no progress to continue; starting from the first layer", partial)
    if not resume and partial.exists():
        if state is not None:
            log.warning("discarding the progress of %d of %d layers in %s (an earlier, interrupted run; run with "
                        "--resume to continue it instead)", state["completed_layers"], num_layers, partial)
        output_dir.remove(partial)
    output_dir.mark(partial)


def run_job(job: QuantizeJob) -> dict:
    """Run the whole job; returns the report (also written to <out>/report.json)."""
    paths = check_job(job)  # the flags alone: nothing is read or written before they pass
    threads_before = torch.get_num_threads()
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    try:
        return _run_checked_job(job, paths)
    finally:
        torch.set_num_threads(threads_before)


def _run_checked_job(job: QuantizeJob, paths: JobPaths) -> dict:
    t_start = time.perf_counter()
    device = parse_device(job.device)
    out, partial = paths.out, paths.partial

    # Everything that can be wrong with the input is checked before anything is written: the flags against the
    # architecture, the calibration and held-out text, then the weights (one read: NaN / Inf, fingerprint).
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source_config = load_config(job.model)
    storage_dtype = as_torch_dtype(None, source_config)  # the checkpoint's own dtype, for what stays unquantized
    expert_bits, routed_bits, allocation = check_job_for_model(job, source_config)
    context = getattr(source_config, "max_position_embeddings", None) or 2048
    job.seqlen = job.seqlen or min(2048, context)
    job.eval_seqlen = job.eval_seqlen or min(512, context)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(job.model))
    calib_ids = (get_calibration_data(job.calib, tokenizer, job.nsamples, job.seqlen, seed=job.seed)
                 if job.method != "rtn" else torch.empty(0, job.seqlen, dtype=torch.long))  # RTN reads no data
    heldout = load_heldout(tokenizer, job.eval_samples, job.eval_seqlen)

    lazy = use_lazy_loading(job.lazy, source_config, pick_dtype(job.dtype, device))
    loader = None
    if lazy:
        try:
            loader = LayerLoader(resolve_model(job.model), pick_dtype(job.dtype, device))
        except (OSError, ValueError) as exc:
            raise JobError(f"cannot load model {job.model!r} lazily: {one_line(exc)}") from exc
        model = loader.model
    else:
        model, _ = load_model(job.model, pick_dtype(job.dtype, device))
    if expert_bits is None:  # --bits auto:B where the allocation needs the in-run proxy, on the calibration tokens
        if lazy and job.sensitivity is None:
            raise JobError("--bits auto:B needs --sensitivity for a lazily loaded model (the proxy needs it in memory)")
        allocation = auto_expert_bits(job.bits, model, calib_ids=None if lazy else calib_ids,
                                      sensitivity=None if job.sensitivity is None else Path(job.sensitivity).expanduser(),
                                      group_size=job.group_size, per_expert=job.per_expert_bits)  # None: the default
        expert_bits, routed_bits = allocation.bits, allocation.expert_bits
    if allocation is not None:
        log.info("%s: expert bits %s (average %.4f over the expert weights; sensitivities from %s)", job.bits,
                 allocation.schedule, allocation.achieved_average, allocation.source)
    qconfig = QuantizeConfig(expert_bits=expert_bits, method=job.method, attn_bits=job.attn_bits,
                             group_size=job.group_size, sym=job.sym, act_order=job.act_order, grid=job.grid,
                             router_topk=job.router_topk, router_steps=job.router_steps, router_lr=job.router_lr,
                             router_solver=job.router_solver,
                             sparse_expert_policy=job.sparse_expert_policy, min_expert_tokens=job.min_expert_tokens,
                             expert_hessian=job.expert_hessian, gptq_target=job.gptq_target,
                             seed=job.seed, routed_expert_bits=routed_bits)
    progress_dir = partial / ".progress"
    quantizer = LayerwiseQuantizer(model, qconfig, device=device, progress_dir=progress_dir,
                                   layer_source=CheckpointLayers(loader) if lazy else None)
    try:
        quantizer.model_fingerprint()  # one read of the weights: NaN / Inf refused before the first layer
        if job.sensitivity is not None and allocation is not None:
            read_sensitivity_file(Path(job.sensitivity), len(quantizer.layers), quantizer.model_fingerprint())
        if job.resume and partial.is_dir():
            quantizer.resumable_layers(calib_ids)  # progress of another model, settings or calibration refused
    except NonFiniteWeightsError as exc:
        raise JobError(str(exc)) from exc
    except AllocationError as exc:
        raise JobError(str(exc)) from exc
    except ProgressMismatchError as exc:
        raise JobError(f"{exc}; run without --resume to start over (that discards the progress)") from exc
    dtype = next(model.parameters()).dtype
    timings["load"] = time.perf_counter() - t0

    prepare_partial(partial, job.resume, len(quantizer.layers))
    # The FP reference for evaluation: a second copy read before any weight changes, or, when lazy, the checkpoint
    # itself read again layer by layer (the skeleton's embedding, norm and head are never quantized).
    if lazy:
        quantized_layers = StoredLayers(loader, lambda i: read_progress_layer(progress_dir, i)[0])
        fp_model, eval_sources = model, {"fp_layers": CheckpointLayers(loader), "q_layers": quantized_layers}
    else:
        fp_model, eval_sources = load_model(job.model, dtype)[0], {}
    t0 = time.perf_counter()
    layer_reports = quantizer.run(calib_ids, resume=job.resume)
    timings["quantize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    evaluation = {source: measure_expert_shift(fp_model, model, ids, batch_size=qconfig.batch_size, device=device,
                                               **eval_sources).to_dict()
                  for source, ids in heldout.items()}
    timings["evaluate"] = time.perf_counter() - t0

    account = bits_account(quantizer)
    metadata = export_metadata(job, qconfig, account, layer_reports)
    if allocation is not None:
        metadata["bit_allocation"] = {"spec": allocation.spec, "source": allocation.source,
                                      "average_expert_bits": allocation.achieved_average, "rule": allocation.rule,
                                      "schedule": allocation.schedule}
    t0 = time.perf_counter()
    write_checkpoint(job, partial, model, tokenizer, quantizer, loader if lazy else None, metadata, storage_dtype)
    timings["save"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    seconds_by_stage: dict[str, float] = {}
    for r in layer_reports:
        for k, v in r.seconds.items():
            seconds_by_stage[k] = seconds_by_stage.get(k, 0.0) + v
    report = {
        "model": job.model, "job": asdict(job), "quantization": metadata, "lazy_loading": lazy,
        "device": str(device), "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
        "format": job.format, "expert_bits": expert_bits,
        # as quantized (read back from the quantized matrices, not from the schedule): per routed expert, and the
        # average code bits over the expert weights that `--bits auto:B` budgets
        "routed_expert_bits": account.routed_expert_table(len(quantizer.layers)),
        "average_expert_bits": account.expert_average_bits, "average_bits_paper": account.paper_average_bits,
        "average_bits_true": account.true_average_bits, "size_bytes": account.size_bytes,
        "bit_allocation": allocation.as_dict() if allocation is not None else None,
        "evaluation": evaluation, "timings_seconds": timings, "layer_seconds_by_stage": seconds_by_stage,
        "layers": [asdict(r) for r in layer_reports],
    }
    (partial / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    if allocation is not None:
        from .report import SCHEDULE_FILE

        (partial / SCHEDULE_FILE).write_text(allocation.schedule + "\n")
    try:
        from .report import plot_report

        plot_report(report, partial / "report.png")
    except Exception as exc:  # a plot must never cost the user a finished quantization
        log.warning("could not draw report.png: %s", exc)
    shutil.rmtree(partial / ".progress", ignore_errors=True)
    if out.exists():
        if not output_dir.is_marked(out):  # it appeared during the run
            raise JobError(f"{out} appeared during the run and eacmoe did not write it; the result is in {partial}")
        output_dir.remove(out)
    os.replace(partial, out)
    report["out"] = str(out)
    return report
