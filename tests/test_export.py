"""Packed export and runtime: export -> AutoModelForCausalLM(trust_remote_code) -> the same logits as the in-memory
quantized model, on tiny random models of every family; refusal without trust_remote_code; integrity manifest."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from eacmoe.adapters import get_adapter
from eacmoe.export import export_model, gptq_quantize_config, in_memory_layers, non_layer_state, pack_model
from eacmoe.runtime.manifest import MANIFEST_NAME
from eacmoe.runtime.packed_modules import PackedLinear
from test_pipeline import calib_ids, quantize
from tiny_models import FAMILY_NAMES

torch.set_num_threads(1)


def export(model, q, out: Path, fmt: str = "packed", tokenizer=None, **kw) -> Path:
    out.mkdir(parents=True)
    export_model(out, fmt, model, in_memory_layers(model, q.quantized), non_layer_state(model), tokenizer,
                 {"method": q.config.method}, torch.float32, **kw)
    return out


def load(out: Path, **kw):
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32, **kw)


@pytest.fixture(scope="module")
def mixtral_export(tmp_path_factory):
    model, q = quantize("mixtral", bits=3)
    ids = calib_ids(2, 16, seed=5)
    with torch.no_grad():
        reference = model(ids).logits
    out = export(model, q, tmp_path_factory.mktemp("mixtral") / "packed")
    return out, ids, reference


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_export_load_same_logits(name: str, tmp_path: Path) -> None:
    model, q = quantize(name, bits=2)
    ids = calib_ids(2, 16, seed=5)
    with torch.no_grad():
        reference = model(ids).logits
    loaded = load(export(model, q, tmp_path / "out"))
    assert type(loaded).__name__ == type(model).__name__
    adapter = get_adapter(loaded)
    block = next(adapter.moe_block(layer) for layer in adapter.decoder_layers(loaded) if adapter.moe_block(layer) is not None)
    assert type(adapter.experts(block)).__name__ == "PackedExperts"  # the copy shipped in the checkpoint
    with torch.no_grad():
        logits = loaded(ids).logits
    # the dequantized weights are bit-identical (fp16 scales throughout); only summation order may differ
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_packed_model_in_memory_matches_and_is_small() -> None:
    model, q = quantize("qwen2_moe", bits=2)
    ids = calib_ids(2, 16, seed=5)
    with torch.no_grad():
        reference = model(ids).logits
    fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    pack_model(model, q.quantized)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-5)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == len(q.quantized)
    for m in packed:  # 2-bit codes: K*N/16 int32 words
        assert m.qweight.numel() * 32 == m.in_features * m.out_features * m.bits
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert total < fp_bytes


def test_generate_after_load(mixtral_export) -> None:
    out, ids, _ = mixtral_export
    generated = load(out).generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)


def test_loading_without_trust_remote_code_refuses(mixtral_export) -> None:
    out, _, _ = mixtral_export
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out)


def test_config_records_the_quantization(mixtral_export) -> None:
    out, _, _ = mixtral_export
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "eacmoe" and config["auto_map"]["AutoModelForCausalLM"]
    assert config["base_config"]["model_type"] == "mixtral"
    assert config["pesf"] == {"enabled": False, "alpha": 0.3, "renormalize": False}
    kinds = {spec["kind"] for spec in config["quantized_modules"].values()}
    assert kinds == {"linear", "experts"}
    for name in ("modeling_eacmoe.py", "packed_modules.py", "packing.py", "grid.py", "pesf.py", "manifest.py"):
        assert (out / name).is_file()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_weights_are_detected(mixtral_export, tmp_path: Path, damage: str) -> None:
    out, _, _ = mixtral_export
    copy_dir = tmp_path / "damaged"
    import shutil

    shutil.copytree(out, copy_dir)
    weights = copy_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
        match = "truncated"
    else:
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
        match = "SHA-256"
    with pytest.raises(OSError, match=match):
        load(copy_dir)


def test_missing_manifest_is_refused(mixtral_export, tmp_path: Path) -> None:
    out, _, _ = mixtral_export
    import shutil

    shutil.copytree(out, tmp_path / "c")
    (tmp_path / "c" / MANIFEST_NAME).unlink()
    with pytest.raises(OSError, match="manifest"):
        load(tmp_path / "c")


def test_sharded_export_loads(tmp_path: Path) -> None:
    model, q = quantize("mixtral", bits=4)
    ids = calib_ids(1, 8, seed=2)
    with torch.no_grad():
        reference = model(ids).logits
    out = export(model, q, tmp_path / "sharded", max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(load(out)(ids).logits, reference, rtol=1e-5, atol=1e-5)


def test_gptq_config_dynamic_overrides() -> None:
    specs = {"model.layers.0.self_attn.q_proj": {"kind": "linear", "bits": 4, "group_size": 32, "sym": False},
             "model.layers.0.mlp.experts": {"kind": "experts", "bits": 3, "group_size": 32, "sym": False},
             "model.layers.1.mlp.experts": {"kind": "experts", "bits": 2, "group_size": 32, "sym": False},
             "model.layers.2.mlp.experts": {"kind": "experts", "bits": 2, "group_size": 32, "sym": False}}
    cfg = gptq_quantize_config(specs, {"act_order": False})
    assert cfg["bits"] == 2 and cfg["format"] == "gptq" and cfg["quant_method"] == "gptq"
    assert set(cfg["dynamic"]) == {r"+:^model\.layers\.0\.self_attn\.q_proj$",
                                   r"+:^model\.layers\.0\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$"}


def test_tied_embeddings_export(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM as Auto

    from tiny_models import SPECS

    config = SPECS["mixtral"].make_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = Auto.from_config(config).eval()
    model.set_experts_implementation("eager")
    model, q = quantize("mixtral", bits=2, model=model)
    ids = calib_ids(1, 8, seed=3)
    with torch.no_grad():
        reference = model(ids).logits
    loaded = load(export(model, q, tmp_path / "tied"))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference, rtol=1e-5, atol=1e-5)
