"""The checks of a quantization job's inputs, made before a weight is read or anything is written.

`check_job` looks at the flags alone (counts, choices, the model and output paths) and warns about flags the
chosen mode ignores; `check_job_for_model` compares them with the architecture, from a skeleton on the meta
device (bits per layer, group size, router K, sequence lengths). A problem is a `JobError` whose message is one
line for the user.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from . import output_dir
from .adapters import get_adapter
from .bit_allocation import (
    AllocationError,
    allocate_per_expert,
    allocation_from_sensitivities,
    file_needs_proxy,
    is_auto_bits,
    layer_expert_params,
    layer_modules,
    parse_auto_budget,
    read_expert_sensitivities,
    read_sensitivity_file,
)
from .assets import BUNDLED_MODELS, resolve_model
from .expert_hessian import EXPERT_HESSIANS
from .export import EXPORT_FORMATS, is_packed_export
from .gptq_target import check_gptq_target
from .lazy_loading import build_skeleton
from .pipeline import METHODS
from .schedule import ALLOWED_BITS, BitsError, check_expert_counts, check_group_size, parse_bits_schedule
from .sparse_experts import SPARSE_EXPERT_POLICIES

log = logging.getLogger(__name__)

ROUTER_SOLVERS = ("adam", "ridge")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROUTER_FLAGS = ("router_topk", "router_steps", "router_lr", "router_solver")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class JobError(ValueError):
    """A bad input to the quantization job; the message is meant for the user, one line."""


@dataclass(frozen=True)
class JobPaths:
    out: Path        # the finished output directory
    partial: Path    # where the run writes until it is complete (and keeps its progress for --resume)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# -- the flags alone ---------------------------------------------------------------------------------------
def check_job(job) -> JobPaths:
    """Every check of `job` (a `workflow.QuantizeJob`) that needs no model; returns where the output goes."""
    _check_numbers(job)
    _check_choices(job)
    parse_device(job.device)
    check_model_source(job.model)
    _check_auto_bits(job)
    paths = check_output(job)
    for warning in ineffective_flags(job):
        log.warning("%s", warning)
    return paths


def _check_auto_bits(job) -> None:
    """`--bits auto:B` (B in range) and `--sensitivity` (an existing file, only with auto bits; RTN needs it)."""
    auto = is_auto_bits(job.bits)
    if auto:
        try:
            parse_auto_budget(job.bits)
        except AllocationError as exc:
            raise JobError(str(exc)) from exc
    if getattr(job, "per_expert_bits", None) is not None and not auto:
        flag_name = "--per-expert-bits" if job.per_expert_bits else "--no-per-expert-bits"
        raise JobError(f"{flag_name} is only used with --bits auto:B (got --bits {job.bits})")
    sensitivity = getattr(job, "sensitivity", None)
    if sensitivity is not None:
        if not auto:
            raise JobError(f"--sensitivity is only used with --bits auto:B (got --bits {job.bits})")
        if not Path(sensitivity).expanduser().is_file():
            raise JobError(f"--sensitivity {sensitivity}: no such file")
    elif auto and job.method == "rtn":
        raise JobError("--bits auto:B with --method rtn needs --sensitivity (the in-run proxy needs calibration data)")


def allocates_per_expert(job) -> bool:
    """Whether the job's `--bits auto:B` is allocated per routed expert: the default, measured better than per layer
    on both bundled models with and without a sensitivity file (docs/QUANTIZING.md); `--no-per-expert-bits` asks
    for per-layer widths. (By default a file without per-expert cells that the proxy cannot complete is still
    allocated per layer: `bit_allocation.auto_expert_bits` with ``per_expert=None``.)"""
    return is_auto_bits(job.bits) and getattr(job, "per_expert_bits", None) is not False


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_numbers(job) -> None:
    at_least = {"nsamples": 1, "seqlen": 2, "eval_samples": 1, "eval_seqlen": 2, "router_steps": 1,
                "router_topk": 1, "threads": 1, "min_expert_tokens": 1}
    optional = {"seqlen", "eval_seqlen", "router_topk", "threads", "min_expert_tokens"}  # None: from the model/torch
    for name, low in at_least.items():
        value = getattr(job, name)
        if value is None and name in optional:
            continue
        if not _is_int(value) or value < low:
            raise JobError(f"{flag(name)} must be a whole number >= {low} (got {value!r})")
    lr = job.router_lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise JobError(f"--router-lr must be a positive number (got {lr!r})")
    if job.attn_bits is not None and job.attn_bits not in ALLOWED_BITS:
        raise JobError(f"--attn-bits must be one of {', '.join(map(str, ALLOWED_BITS))} or 16 (got {job.attn_bits})")
    try:
        check_group_size(job.group_size, ())
    except BitsError as exc:
        raise JobError(str(exc)) from exc
    if not _is_int(job.seed):
        raise JobError(f"--seed must be a whole number (got {job.seed!r})")


def _check_choices(job) -> None:
    choices = {"method": METHODS, "format": EXPORT_FORMATS, "router_solver": ROUTER_SOLVERS,
               "sparse_expert_policy": SPARSE_EXPERT_POLICIES, "dtype": tuple(DTYPES),
               "expert_hessian": tuple(EXPERT_HESSIANS)}
    for name, allowed in choices.items():
        if getattr(job, name) not in allowed:
            raise JobError(f"{flag(name)} must be one of {', '.join(allowed)} (got {getattr(job, name)!r})")
    try:
        check_gptq_target(job.gptq_target, job.method)
    except ValueError as exc:
        raise JobError(str(exc)) from exc


def parse_device(name: str) -> torch.device:
    """auto (CUDA when there is a GPU), cpu, cuda or cuda:N, refused unless it exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(name)):
        raise JobError(f"--device must be auto, cpu, cuda or cuda:N (got {name!r})")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise JobError(f"--device {name} asked for but no CUDA GPU is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise JobError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_model_source(name: str) -> None:
    """A bundled model, an existing model directory or something shaped like a hub id (owner/name)."""
    if name in BUNDLED_MODELS:
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise JobError(f"--model {name} is a file; give the directory that holds the model's config.json")
        if not (path / "config.json").is_file():
            raise JobError(f"--model {name}: the directory holds no config.json (not a Hugging Face model directory)")
        if is_packed_export(path):
            raise JobError(f"--model {name} is an eacmoe packed export, already quantized; give the original model")
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise JobError(f"--model {name}: no such directory")
    if not _HUB_ID.fullmatch(name):
        raise JobError(f"--model {name}: not a bundled model ({', '.join(BUNDLED_MODELS)}), an existing directory "
                       "or a hub id (owner/name)")


def default_out(job) -> Path:
    bits = str(job.bits).replace(":", "").replace("/", "-") + ("e" if allocates_per_expert(job) else "")
    return Path("out") / f"{Path(resolve_model(job.model)).name}-{job.method}-w{bits}"


def check_output(job) -> JobPaths:
    """`--out` must be a new directory, or with --overwrite one that eacmoe wrote; `<out>.partial` likewise."""
    out = Path(job.out).expanduser() if job.out else default_out(job)
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if out.name in ("", ".", "..") or resolved == cwd or resolved in cwd.parents:
        raise JobError(f"--out {job.out} is the current directory or one above it; name a new directory")
    partial = output_dir.partial_dir(out)
    for path in (out, partial):
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise JobError(f"{path} exists and is not a directory; remove it or choose another --out")
    if out.exists():
        if not job.overwrite:
            raise JobError(f"output directory {out} already exists; pass --overwrite to replace it")
        if not output_dir.is_marked(out):
            raise JobError(f"--overwrite refuses to delete {out}: eacmoe did not write it (no "
                           f"{output_dir.MARKER_NAME} in it); remove it yourself or choose another --out")
    if partial.exists() and not output_dir.is_marked(partial):
        raise JobError(f"{partial} exists but eacmoe did not write it (no {output_dir.MARKER_NAME} in it); "
                       "remove it yourself or choose another --out")
    model = Path(resolve_model(job.model)).expanduser()
    if model.is_dir() and (model.resolve() == resolved or resolved in model.resolve().parents):
        raise JobError(f"--out {out} would replace the model being quantized ({job.model})")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise JobError(f"cannot write to {out}: {parent} is not a writable directory")
    return JobPaths(out, partial)


def ineffective_flags(job) -> list[str]:
    """Flags set to something other than their default that the chosen method or solver ignores, with why."""
    ignored: dict[str, str] = {}
    if job.method in ("rtn", "gptq"):
        ignored.update(dict.fromkeys(ROUTER_FLAGS, f"--method {job.method} leaves the routers as they are"))
    elif job.method == "qesc-mse":
        ignored["router_topk"] = "--method qesc-mse fits the router logits of all experts (plain MSE)"
    if job.method in ("qesc", "qesc-mse") and job.router_solver == "ridge":
        ignored.update(dict.fromkeys(("router_steps", "router_lr"),
                                     "--router-solver ridge solves for the router exactly, without steps"))
    if job.method == "rtn":
        ignored.update(dict.fromkeys(("calib", "nsamples", "seqlen", "seed"), "--method rtn uses no calibration data"))
        ignored["act_order"] = "--method rtn has no Hessian to order columns by"
        ignored["sparse_expert_policy"] = "--method rtn quantizes every expert the same way"
        ignored["min_expert_tokens"] = "--method rtn quantizes every expert the same way"
    elif not SPARSE_EXPERT_POLICIES[job.sparse_expert_policy].uses_min_expert_tokens:
        ignored["min_expert_tokens"] = (f"--sparse-expert-policy {job.sparse_expert_policy} has its own token "
                                        "threshold")
        ignored["expert_hessian"] = "--method rtn has no Hessian"
    defaults = {f.name: f.default for f in fields(job)}
    return [f"{flag(name)} has no effect: {why}" for name, why in ignored.items()
            if getattr(job, name) != defaults[name]]


# -- the flags against the model ---------------------------------------------------------------------------
def quantized_input_widths(model: nn.Module, attention: bool) -> set[int]:
    """Input widths of every Linear the job quantizes: experts, shared experts, dense MLPs, attention if asked."""
    adapter = get_adapter(model)
    widths: set[int] = set()
    for layer in adapter.decoder_layers(model):
        groups = adapter.dense_mlp_linears(layer) + (adapter.attention_linears(layer) if attention else [])
        block = adapter.moe_block(layer)
        if block is not None:
            widths.update(w.shape[1] for w in adapter.expert_weights(block, 0).values())
            groups += adapter.shared_experts(block)
        for group in groups:
            widths.update(linear.in_features for _, linear in group)
    return widths


def check_group_size_for_model(model: nn.Module, group_size: int, attention: bool = True) -> None:
    """`--group-size` against the model (may be a meta skeleton); raises BitsError."""
    check_group_size(group_size, quantized_input_widths(model, attention))


def check_job_for_model(job, config):
    """The flags against the architecture of `config` (a skeleton on the meta device, nothing read); returns
    the experts' bit width per decoder layer, the per-routed-expert widths of a per-module schedule (else None) and,
    for `--bits auto:B`, the `bit_allocation.Allocation` behind them (else None). With auto bits and no sensitivity
    file the widths are None: the in-run proxy sets them."""
    skeleton = build_skeleton(config, torch.float32)
    adapter = get_adapter(skeleton)
    layers = adapter.decoder_layers(skeleton)
    allocation = routed = None
    if is_auto_bits(job.bits):
        expert_bits = None
        if getattr(job, "sensitivity", None) is not None:
            path = Path(job.sensitivity).expanduser()
            try:
                if allocates_per_expert(job):
                    modules = layer_modules(skeleton)
                    scores, how = read_expert_sensitivities(path, modules)  # the file's checks, now
                    if not file_needs_proxy(path, modules):  # else allocated with the proxy, the model in memory
                        allocation = allocate_per_expert(job.bits, modules, scores, how)
                else:
                    scores = read_sensitivity_file(path, len(layers))
                    allocation = allocation_from_sensitivities(job.bits, layer_expert_params(skeleton), scores,
                                                               str(job.sensitivity))
            except AllocationError as exc:
                raise JobError(str(exc)) from exc
            if allocation is not None:
                expert_bits, routed = allocation.bits, allocation.expert_bits
    else:
        expert_bits, routed = parse_bits_schedule(job.bits, len(layers))
        blocks = [adapter.moe_block(layer) for layer in layers]
        check_expert_counts(routed, [None if b is None else adapter.num_experts(b) for b in blocks])
    check_group_size_for_model(skeleton, job.group_size, attention=job.attn_bits is not None)
    if job.method == "qesc" and job.router_topk is not None:
        experts = min(adapter.num_experts(block) for block in map(adapter.moe_block, layers) if block is not None)
        if job.router_topk > experts:
            raise JobError(f"--router-topk {job.router_topk} is more than the {experts} experts of this model")
    context = getattr(config, "max_position_embeddings", None)
    lengths = {"eval_seqlen": job.eval_seqlen, **({} if job.method == "rtn" else {"seqlen": job.seqlen})}
    for name, value in lengths.items():
        if context and value is not None and value > context:
            raise JobError(f"{flag(name)} {value} is longer than the model's context of {context} tokens")
    return expert_bits, routed, allocation
