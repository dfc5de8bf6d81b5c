"""Write a real-shape slice: a synthetic checkpoint with exactly the per-layer dimensions of Mixtral-8x7B or
Qwen3-30B-A3B, and only a few decoder layers.

    python scripts/make_real_shape_slice.py --family qwen3-30b-a3b --out /tmp/slices/qwen3-2l
    python scripts/make_real_shape_slice.py --family mixtral-8x7b --layers 1 --out /tmp/slices/mixtral-1l

SLICES MEASURE COST, NOT ACCURACY. The weights are random (normal with the family's init std, the config's
`initializer_range`, for every matrix including the routers; norms 1), so quantizing a slice tells how long a
layer of the real model takes and how much memory it needs, never how good the quantized model is. Every number
measured on a slice is labelled so.

What is real: every decoder layer has the dimensions of the bundled config (eacmoe/assets/configs/<family>.json:
hidden size, heads, head_dim, experts, expert intermediate size), the dtype is bfloat16 as on the hub, the tensors
are stored in sharded safetensors with `model.safetensors.index.json` under the hub's keys (the per-expert layout,
e.g. Mixtral `model.layers.L.block_sparse_moe.experts.E.w1.weight`, Qwen3-MoE
`model.layers.L.mlp.experts.E.gate_proj.weight`). What is not: the number of layers (`--layers`, default 2) and the
vocabulary, cut to the bundled tokenizer's 8192 tokens so that the embedding and the head stay small.

The hub key layout is not written down here per family: it is what transformers' own `save_pretrained` conversion
(`revert_weight_conversion`) makes of the model's state dict, computed on a meta-device model (no memory). The
writer streams each safetensors file tensor by tensor (header first, then one tensor's bytes at a time, generated in
row blocks), so memory stays at one row block whatever the slice size: a Mixtral-8x7B layer is 2.8 GB in bfloat16.
The directory is written as `<out>.partial` and renamed when complete, so a failure leaves nothing half-written.

`--set KEY=VALUE` overrides config fields (small dimensions for tests, the same code path).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import struct
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from eacmoe.assets import ASSETS_DIR, TOKENIZER_DIR  # noqa: E402
from eacmoe.cli import OneLineErrorParser, positive_int, print_error, setup_logging  # noqa: E402

log = logging.getLogger("make_real_shape_slice")

CONFIGS_DIR = ASSETS_DIR / "configs"
FAMILIES = ("mixtral-8x7b", "qwen3-30b-a3b")
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
BLOCK_BYTES = 64 * 2**20  # fp32 bytes of one generated row block
NOTE = ("Synthetic real-shape slice: random weights with the layer dimensions of {family}. It measures cost "
        "(time, memory), not accuracy.")


class SliceError(ValueError):
    """A bad request (unknown family, bad --set, existing output)."""


def parse_override(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON when it parses (numbers, true/false, null, lists), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SliceError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def slice_config(family: str, layers: int, overrides: dict[str, object]):
    """The family's bundled config with `layers` decoder layers, the bundled tokenizer's vocabulary, bfloat16."""
    from transformers import AutoConfig, AutoTokenizer

    path = CONFIGS_DIR / f"{family}.json"
    if not path.is_file():
        raise SliceError(f"no bundled config for {family!r}; choose from {', '.join(FAMILIES)}")
    fields = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    bundled = set(fields)
    fields.update(num_hidden_layers=layers, vocab_size=len(AutoTokenizer.from_pretrained(TOKENIZER_DIR)))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the hub's ids may exceed the cut vocabulary
        fields.pop(key, None)
    fields.update(overrides)
    config_cls = type(AutoConfig.for_model(fields["model_type"]))
    unknown = [k for k in overrides if k not in bundled and not hasattr(config_cls(), k)]
    if unknown:
        raise SliceError(f"--set: {config_cls.__name__} has no field {', '.join(unknown)}")
    config = config_cls(**{k: v for k, v in fields.items() if k != "model_type"})
    config.dtype = torch.bfloat16
    return config


def hub_layout(config) -> dict[str, torch.Tensor]:
    """Checkpoint key -> meta tensor (shape, dtype) as `save_pretrained` writes this config's model: the model's
    state dict built on the meta device, tied copies dropped, reverted to the hub's per-expert layout."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    return revert_weight_conversion(model, state)


def _natural_key(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def plan_shards(layout: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Keys in natural order (layer by layer, expert by expert), cut into shards of at most `max_shard_bytes`
    (a single larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(layout, key=_natural_key):
        nbytes = layout[key].numel() * layout[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def tensor_kind(key: str) -> str:
    """How a tensor is initialised: "ones" (RMSNorm weights, as the model's init), "zeros" (biases) or "normal"
    (every matrix: attention, router, experts, embedding, head)."""
    if key.endswith("norm.weight"):
        return "ones"
    if key.endswith(".bias"):
        return "zeros"
    if key.endswith(".weight"):
        return "normal"
    raise SliceError(f"do not know how to initialise {key!r}")


def tensor_blocks(key: str, shape: tuple[int, ...], dtype: torch.dtype, std: float, seed: int):
    """The values of tensor `key`, as contiguous row blocks of at most BLOCK_BYTES in fp32. The generator is seeded
    from `seed` and the key alone, so a tensor does not depend on the shard plan or on the other tensors."""
    kind = tensor_kind(key)
    rows = shape[0] if shape else 1
    row_numel = max(1, torch.Size(shape[1:]).numel())
    step = max(1, BLOCK_BYTES // (4 * row_numel))
    generator = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(key.encode()))
    for start in range(0, rows, step):
        block_shape = (min(step, rows - start), *shape[1:])
        if kind == "normal":
            block = torch.empty(block_shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        else:
            block = torch.full(block_shape, 1.0 if kind == "ones" else 0.0)
        yield block.to(dtype)


def write_safetensors_streaming(path: Path, layout: dict[str, torch.Tensor], keys: list[str], std: float,
                                seed: int) -> int:
    """Write `keys` to a safetensors file: the header (computed from the shapes alone), then each tensor's bytes
    block by block. Returns the bytes of tensor data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in keys:
        meta = layout[key]
        nbytes = meta.numel() * meta.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[meta.dtype], "shape": list(meta.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for key in keys:
            meta = layout[key]
            for block in tensor_blocks(key, tuple(meta.shape), meta.dtype, std, seed):
                f.write(memoryview(block.contiguous().view(torch.uint8).numpy()))
    return offset


def write_slice(family: str, out: Path, layers: int = 2, overrides: dict[str, object] | None = None,
                seed: int = 0, max_shard_bytes: int = 4 * 2**30, overwrite: bool = False) -> dict:
    """Write the slice to `out` (see the module docstring); returns what slice.json records."""
    from transformers import AutoTokenizer

    if layers < 1:
        raise SliceError(f"--layers must be at least 1 (got {layers})")
    if out.exists() and not overwrite:
        raise SliceError(f"{out} exists; pass --overwrite to replace it")
    config = slice_config(family, layers, overrides or {})
    layout = hub_layout(config)
    std = float(config.initializer_range)
    shards = plan_shards(layout, max_shard_bytes)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for i, keys in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors_streaming(partial / name, layout, keys, std, seed)
            weight_map.update(dict.fromkeys(keys, name))
            log.info("wrote %s (%d tensors)", name, len(keys))
        params = sum(t.numel() for t in layout.values())
        index = {"metadata": {"total_parameters": params, "total_size": total}, "weight_map": weight_map}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config.architectures = [json.loads((CONFIGS_DIR / f"{family}.json").read_text())["architectures"][0]]
        config.save_pretrained(partial)
        AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(partial)
        layer_params = sum(t.numel() for k, t in layout.items() if re.match(r"model\.layers\.0\.", k))
        info = {"note": NOTE.format(family=family), "family": family, "layers": layers, "seed": seed,
                "init_std": std, "overrides": overrides or {}, "dtype": "bfloat16", "total_bytes": total,
                "layer_bytes": layer_params * 2, "parameters": params, "shards": len(shards)}
        (partial / "slice.json").write_text(json.dumps(info, indent=2) + "\n")
        (partial / "README.md").write_text(f"# {family} real-shape slice ({layers} layers)\n\n{info['note']}\n\n"
                                           "Written by scripts/make_real_shape_slice.py; see slice.json.\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return info


def main(argv: list[str] | None = None) -> int:
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, required=True, help="whose layer dimensions the slice has")
    p.add_argument("--out", type=Path, required=True, help="output directory (refused if it exists, see --overwrite)")
    p.add_argument("--layers", type=positive_int, default=2, help="decoder layers")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="largest safetensors shard, GB (2**30 bytes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set hidden_size=64 (small shapes for tests); repeatable")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    setup_logging()
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        info = write_slice(args.family, args.out, args.layers, overrides, args.seed,
                           int(args.max_shard_gb * 2**30), args.overwrite)
    except (SliceError, TypeError) as exc:
        print_error(exc)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
