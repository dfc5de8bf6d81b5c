"""`--format gptq` is loaded by GPTQModel (an independent implementation of the GPTQ checkpoint convention) and
gives the logits of our own runtime. GPTQModel's CPU kernels (TorchLinear) compute in fp16/bf16 only: the
comparison loads in fp16 and casts the model to fp32, so the dequantized weights carry fp16 rounding (scales are
exact fp16 values, but (code - zero) * scale is rounded to fp16 by its kernel) - hence the tolerance.

GPTQModel runs in a subprocess: loading a model makes it patch transformers' MoE classes process-wide (its
`defuser` swaps the fused experts blocks for per-expert ModuleLists), which would break every later test.

The weight files carry GPTQModel's legacy base name (gptq_model-{bits}bit-{group}g, which plain transformers does
not look for), single or sharded; GPTQModel must find them and fill every tensor of its model from them."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eacmoe.assets import TOKENIZER_DIR
from eacmoe.export import DEFAULT_MAX_SHARD_BYTES

from test_export import export, load
from test_pipeline import calib_ids, quantize
from tiny_models import SPECS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="gptqmodel is not installed")
torch.set_num_threads(1)

# max |logit difference| allowed, relative to the logits' spread (std): fp16 dequantization noise only
RELATIVE_TOLERANCE = 2e-3


GPTQMODEL_LOGITS = """
import sys, torch
import gptqmodel
from gptqmodel import BACKEND, GPTQModel
from eacmoe.verify import tensors_not_in_checkpoint
path, ids_file, out_file = sys.argv[1:4]
model = GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model.to(torch.float32).eval()
quantized = sum(1 for m in model.modules() if isinstance(m, gptqmodel.nn_modules.qlinear.BaseQuantLinear))
with torch.no_grad():
    logits = model(torch.load(ids_file)).logits
torch.save({"logits": logits, "quantized_modules": quantized, "made_up": tensors_not_in_checkpoint(model, path)},
           out_file)
"""


def gptqmodel_logits(path: Path, ids: torch.Tensor, tmp_path: Path) -> dict:
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", GPTQMODEL_LOGITS, str(path), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def all_moe(name: str):
    """The tiny model of `name` with every layer MoE: GPTQModel 7.6.0's Qwen2-MoE definition has no entry for the
    dense MLP of an `mlp_only_layers` layer and leaves it uninitialised (NaN logits), so this test avoids one."""
    config = SPECS[name].make_config()
    if hasattr(config, "mlp_only_layers"):
        config.mlp_only_layers = []
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.set_experts_implementation("eager")
    return model


@pytest.mark.parametrize("name,bits,max_shard_bytes", [("mixtral", [3, 2, 2], None), ("qwen2_moe", [2, 4, 2], 60_000)])
def test_gptqmodel_loads_our_gptq_export(tmp_path: Path, name: str, bits: list[int], max_shard_bytes) -> None:
    # per-layer expert widths differ from attention's 4 bits: exercises GPTQModel's `dynamic` overrides
    # (group size 16: GPTQModel's CPU kernel needs >= 16)
    model, q = quantize(name, bits=bits, group_size=16, model=all_moe(name))
    ids = calib_ids(2, 16, seed=7)
    with torch.no_grad():
        reference = model(ids).logits
    packed = load(export(model, q, tmp_path / "packed"))
    model2, q2 = quantize(name, bits=bits, group_size=16, model=all_moe(name))
    gptq_dir = export(model2, q2, tmp_path / "gptq", fmt="gptq", tokenizer=AutoTokenizer.from_pretrained(TOKENIZER_DIR),
                      max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    quantize_config = json.loads((gptq_dir / "quantize_config.json").read_text())
    assert quantize_config["format"] == "gptq" and quantize_config["dynamic"]
    shards = list(gptq_dir.glob("gptq_model-*.safetensors"))
    assert (len(shards) > 1) == bool(max_shard_bytes)
    index = gptq_dir / f"gptq_model-{quantize_config['bits']}bit-16g.safetensors.index.json"
    assert index.is_file() == bool(max_shard_bytes)

    theirs = gptqmodel_logits(gptq_dir, ids, tmp_path)
    assert theirs["quantized_modules"] == len(q2.quantized), "GPTQModel did not build every quantized module"
    assert theirs["made_up"] == [], "GPTQModel initialised tensors the checkpoint does not hold"
    with torch.no_grad():
        ours = packed(ids).logits
    logits = theirs["logits"]
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    error = (logits - ours).abs().max() / ours.std()
    assert error < RELATIVE_TOLERANCE, f"GPTQModel vs eacmoe runtime: max |diff| / std = {error:.2e}"
