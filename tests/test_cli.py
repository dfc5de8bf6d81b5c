"""`python -m eacmoe.quantize`: bad input gets a one-line error and a non-zero exit, and nothing half-written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from eacmoe.assets import TOKENIZER_DIR
from eacmoe.quantize import build_parser

REPO = Path(__file__).resolve().parent.parent


def save_tiny(path: Path, model) -> Path:
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=8192, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                        num_experts_per_tok=2)
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", MixtralForCausalLM(cfg))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "eacmoe.quantize", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]


def test_help_explains_every_flag() -> None:
    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.dest


FAST = ("--nsamples", "4", "--seqlen", "32", "--eval-samples", "2", "--eval-seqlen", "32", "--group-size", "32",
        "--router-steps", "5")


@pytest.mark.parametrize("args,needles", [
    (("--model", "/nonexistent/model"), ("cannot load model",)),
    (("--bits", "5"), ("bits must be one of",)),
    (("--bits", "2,2,2"), ("2 layers",)),
    (("--group-size", "48"), ("does not divide",)),
    (("--calib", "/nonexistent/file.txt"), ("does not exist",)),
])
def test_bad_input_one_line_error(tiny_mixtral: Path, tmp_path: Path, args, needles) -> None:
    out = tmp_path / "out"
    result = run_cli("--model", str(tiny_mixtral), *FAST, "--out", str(out), *args)
    assert_one_line_error(result, *needles)
    assert not out.exists()


def test_dense_model_is_refused(tmp_path: Path) -> None:
    cfg = LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    path = save_tiny(tmp_path / "llama", LlamaForCausalLM(cfg))
    assert_one_line_error(run_cli("--model", str(path), "--out", str(tmp_path / "o")), "llama", "mixtral")


def test_too_little_calibration_text(tiny_mixtral: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    result = run_cli("--model", str(tiny_mixtral), *FAST, "--calib", str(short), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "only", "tokens")


def test_nan_weights_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=8192, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[1, 0, 0] = float("nan")
    path = save_tiny(tmp_path / "nan", model)
    assert_one_line_error(run_cli("--model", str(path), *FAST, "--out", str(tmp_path / "o")), "NaN")


def test_unwritable_out(tiny_mixtral: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("--model", str(tiny_mixtral), *FAST, "--out", str(blocker / "sub" / "out"))
    assert_one_line_error(result, "cannot write")


def test_full_run_writes_complete_directory(tiny_mixtral: Path, tmp_path: Path) -> None:
    out = tmp_path / "done"
    result = run_cli("--model", str(tiny_mixtral), *FAST, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"report.json", "config.json", "model.safetensors", "eacmoe_manifest.json", "modeling_eacmoe.py",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not (tmp_path / "done.partial").exists()
    assert "quant ppl" in result.stdout
    # an existing output directory is never overwritten silently
    assert_one_line_error(run_cli("--model", str(tiny_mixtral), *FAST, "--out", str(out)), "already exists")


def test_gptq_and_dequantized_formats(tiny_mixtral: Path, tmp_path: Path) -> None:
    gptq = tmp_path / "gptq"
    result = run_cli("--model", str(tiny_mixtral), *FAST, "--format", "gptq", "--out", str(gptq))
    assert result.returncode == 0, result.stderr[-3000:]
    quantize_config = json.loads((gptq / "quantize_config.json").read_text())
    assert quantize_config["format"] == "gptq" and quantize_config["quant_method"] == "gptq"
    assert json.loads((gptq / "config.json").read_text())["quantization_config"] == quantize_config
    with safe_open(str(gptq / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.3.down_proj.qweight" in keys and "model.layers.0.mlp.gate.weight" in keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)

    dequantized = tmp_path / "dequantized"
    result = run_cli("--model", str(tiny_mixtral), *FAST, "--format", "dequantized", "--out", str(dequantized))
    assert result.returncode == 0, result.stderr[-3000:]
    model, info = AutoModelForCausalLM.from_pretrained(dequantized, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not (dequantized / "modeling_eacmoe.py").exists()
