"""Packed export and runtime: export -> AutoModelForCausalLM(trust_remote_code) -> the same logits as the in-memory
quantized model, on tiny random models of every family; integrity manifest. Every other load path of the packed
and GPTQ exports (no remote code, the concrete class, lm_eval --model hf, with or without optimum) refuses with
a message that says how to load them; the tokenizers load without a prompt; eacmoe.verify names made-up tensors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM
from transformers.utils import is_gptqmodel_available, is_optimum_available

from eacmoe.adapters import get_adapter
from eacmoe.assets import TOKENIZER_DIR, resolve_model
from eacmoe.export import (DEFAULT_MAX_SHARD_BYTES, PACKED_WEIGHTS_BASENAME, REFUSAL_KEY, export_model,
                           gptq_quantize_config, in_memory_layers, is_packed_export, non_layer_state, pack_model)
from eacmoe.job_checks import JobError, check_model_source
from eacmoe.runtime.manifest import MANIFEST_NAME, write_manifest
from eacmoe.runtime.modeling_eacmoe import PACKED_SECTIONS, build_packed_model
from eacmoe.runtime.packed_modules import PackedLinear
from eacmoe.verify import check_loaded, tensors_not_in_checkpoint
from gptqmodel_env import gptqmodel_import_guard
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
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def mixtral_export(tmp_path_factory, tokenizer):
    model, q = quantize("mixtral", bits=3)
    ids = calib_ids(2, 16, seed=5)
    with torch.no_grad():
        reference = model(ids).logits
    out = export(model, q, tmp_path_factory.mktemp("mixtral") / "packed", tokenizer=tokenizer)
    return out, ids, reference


@pytest.fixture(scope="module")
def mixtral_gptq_export(tmp_path_factory, tokenizer) -> Path:
    model, q = quantize("mixtral", bits=2, group_size=16)
    return export(model, q, tmp_path_factory.mktemp("mixtral") / "gptq", fmt="gptq", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def family_export(tmp_path_factory):
    """``get(name)``: (packed export, ids, in-memory quantized logits, model class) of family ``name``, made once."""
    made = {}

    def get(name: str):
        if name not in made:
            model, q = quantize(name, bits=2)
            ids = calib_ids(2, 16, seed=5)
            with torch.no_grad():
                reference = model(ids).logits
            made[name] = (export(model, q, tmp_path_factory.mktemp(name) / "packed"), ids, reference, type(model))
        return made[name]
    return get


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_export_load_same_logits(name: str, family_export) -> None:
    out, ids, reference, model_class = family_export(name)
    loaded = load(out)
    assert type(loaded) is model_class
    # the original config, without eacmoe's sections (the refusal is meant for transformers' loader)
    assert loaded.config.architectures == [model_class.__name__]
    assert not [key for key in PACKED_SECTIONS if key != "architectures" and hasattr(loaded.config, key)]
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
    """Greedy generation (KV cache) from the loaded export gives the in-memory quantized model's tokens, which are
    also what a cache-free argmax loop over the loaded model's full forward picks."""
    out, ids, _ = mixtral_export
    model, _ = quantize("mixtral", bits=3)  # the model the fixture exported (deterministic)
    prompt, new = ids[:2, :6], 12
    loaded = load(out)
    with torch.no_grad():
        reference = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        generated = loaded.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        stepwise = prompt
        for _ in range(new):
            next_token = loaded(stepwise, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            stepwise = torch.cat([stepwise, next_token], dim=1)
    assert generated.shape == (2, 6 + new)
    assert torch.equal(generated, reference)
    assert torch.equal(generated, stepwise)
    assert generated[:, 6:].unique().numel() > 2  # not a degenerate repetition that any model would match


def count_constructions(monkeypatch: pytest.MonkeyPatch, model_class: type) -> list[type]:
    """Record every construction of ``model_class`` from now on (the model a loader would fill, or leave random)."""
    built: list[type] = []
    init = model_class.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self))
        init(self, *args, **kwargs)
    monkeypatch.setattr(model_class, "__init__", counting_init)
    return built


@pytest.mark.parametrize("kwargs", [{}, {"trust_remote_code": False}], ids=["unset", "false"])
def test_loading_without_trust_remote_code_refuses(mixtral_export, monkeypatch: pytest.MonkeyPatch,
                                                   kwargs: dict) -> None:
    # config.json is the family's, so transformers takes MixtralForCausalLM (no prompt); it stops on the weight
    # files before it builds anything
    out, _, _ = mixtral_export
    built = count_constructions(monkeypatch, MixtralForCausalLM)
    with pytest.raises(ValueError, match=r"eacmoe packed export: .*\.from_pretrained\(DIR, trust_remote_code=True\)"):
        AutoModelForCausalLM.from_pretrained(out, **kwargs)
    assert built == []
    load(out)  # the counter sees constructions: the runtime builds the family's class
    assert built == [MixtralForCausalLM]


def test_config_records_the_quantization(mixtral_export) -> None:
    out, _, _ = mixtral_export
    config = json.loads((out / "config.json").read_text())
    model, _ = quantize("mixtral", bits=3)  # the model the fixture exported
    # the original config at the top level: a tool that reads it as a Mixtral config sees the true shapes
    original = json.loads(model.config.to_json_string(use_diff=False))
    for key, value in original.items():
        if key not in ("architectures", "dtype"):
            assert config[key] == value, key
    assert set(config) == set(original) | set(PACKED_SECTIONS)  # the runtime takes the rest for the original config
    assert config["model_type"] == "mixtral" and "base_config" not in config
    assert config["eacmoe"] == {"format": "packed", "version": 1, "architectures": ["MixtralForCausalLM"]}
    assert config["architectures"] == ["EacmoeForCausalLM"] and config["auto_map"]["AutoModelForCausalLM"]
    assert config[REFUSAL_KEY].startswith("eacmoe packed export")
    assert config["pesf"] == {"enabled": False, "alpha": 0.3, "renormalize": False}
    kinds = {spec["kind"] for spec in config["quantized_modules"].values()}
    assert kinds == {"linear", "experts"}
    for name in ("modeling_eacmoe.py", "packed_modules.py", "packing.py", "grid.py", "pesf.py", "manifest.py"):
        assert (out / name).is_file()


def pre_marker_copy(export_dir: Path, tmp_path: Path) -> Path:
    """A copy of ``export_dir`` in the layout of the exports made before the ``eacmoe`` marker: model_type "eacmoe",
    the original config nested under ``base_config``, the weights in model.safetensors."""
    copy = tmp_path / "pre-marker"
    shutil.copytree(export_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    sections = {key: config.pop(key) for key in PACKED_SECTIONS if key in config}
    old = {"model_type": "eacmoe", "architectures": ["EacmoeForCausalLM"], "auto_map": sections["auto_map"],
           "base_config": {**config, "architectures": sections["eacmoe"]["architectures"]},
           **{key: sections[key] for key in ("quantization", "quantized_modules", "pesf")}}
    (copy / "config.json").write_text(json.dumps(old))
    (copy / f"{PACKED_WEIGHTS_BASENAME}.safetensors").rename(copy / "model.safetensors")
    write_manifest(copy, ["model.safetensors"])
    return copy


def test_export_made_before_the_marker_loads_with_this_runtime(mixtral_export, tmp_path: Path) -> None:
    out, ids, reference = mixtral_export
    old = pre_marker_copy(out, tmp_path)
    loaded = build_packed_model(old, dtype=torch.float32)
    assert type(loaded) is MixtralForCausalLM and loaded.config.architectures == ["MixtralForCausalLM"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference, rtol=1e-5, atol=1e-5)


def test_packed_exports_are_recognised_by_their_marker(mixtral_export, tmp_path: Path) -> None:
    # what eval/run_suite.py (trust_remote_code for lm_eval) and quantize's --model check go by
    out = mixtral_export[0]
    old = pre_marker_copy(out, tmp_path)
    source = resolve_model("tiny-mixtral")
    assert is_packed_export(out) and is_packed_export(old) and not is_packed_export(source)
    for directory in (out, old):
        with pytest.raises(JobError, match="is an eacmoe packed export, already quantized"):
            check_model_source(str(directory))
    check_model_source(source)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_weights_are_detected(mixtral_export, tmp_path: Path, damage: str) -> None:
    out, _, _ = mixtral_export
    copy_dir = tmp_path / "damaged"
    import shutil

    shutil.copytree(out, copy_dir)
    weights = copy_dir / f"{PACKED_WEIGHTS_BASENAME}.safetensors"
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
    assert (out / f"{PACKED_WEIGHTS_BASENAME}.safetensors.index.json").is_file()
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
    out = export(model, q, tmp_path / "tied")
    loaded = load(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    check_loaded(loaded, out)  # the head is not stored: it is the embeddings
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference, rtol=1e-5, atol=1e-5)


# -- every other way to load an export: the real model or a clear refusal, never random experts -------------
def without_protection(export_dir: Path, tmp_path: Path, rename_weights: bool) -> Path:
    """A copy of ``export_dir`` without the ``transformers_weights`` refusal (what a transformers that predates
    that field sees) and, with ``rename_weights``, with its single weight file named model.safetensors: the
    export as it was before it kept transformers out."""
    copy = tmp_path / f"{export_dir.name}-unprotected"
    shutil.copytree(export_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.pop(REFUSAL_KEY, None)
    (copy / "config.json").write_text(json.dumps(config))
    if rename_weights:
        (weights,) = copy.glob("*.safetensors")
        weights.rename(copy / "model.safetensors")
    return copy


def quantized_module_tensors(model: torch.nn.Module, export_dir: Path) -> set[str]:
    """The names of every parameter under a module that config.json lists as quantized."""
    specs = json.loads((export_dir / "config.json").read_text())["quantized_modules"]
    return {f"{path}.{name}" for path in specs for name, _ in model.get_submodule(path).named_parameters()}


def transformers_gptq_refusal() -> tuple[type[Exception] | tuple[type[Exception], ...], str]:
    """How transformers' GPTQ integration refuses our GPTQ export, by what is installed: without optimum (and
    gptqmodel) it stops before reading anything; with both, it reaches the export's `transformers_weights`."""
    if not is_optimum_available():
        return ImportError, r"requires optimum"
    if not is_gptqmodel_available():
        return (ImportError, RuntimeError), r"gptqmodel|GPU is required"
    return ValueError, r"eacmoe GPTQ export .*randomly initialised; load it with GPTQModel"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_concrete_class_refuses_the_packed_export(name: str, family_export, monkeypatch: pytest.MonkeyPatch) -> None:
    # config.json is a valid config of the family's own class, whose experts would be random: it stops before
    # building the model (transformers resolves the weight files first)
    out, _, _, model_class = family_export(name)
    built = count_constructions(monkeypatch, model_class)
    with pytest.raises(ValueError, match=r"eacmoe packed export: .*\.from_pretrained\(DIR, trust_remote_code=True\)"):
        model_class.from_pretrained(out)
    assert built == []


@pytest.mark.parametrize("max_shard_bytes", [None, 200_000])
def test_packed_weight_files_are_not_where_transformers_looks(tmp_path: Path, max_shard_bytes: int | None) -> None:
    # the second guard, for a transformers that ignores `transformers_weights`
    model, q = quantize("mixtral", bits=4)
    out = export(model, q, tmp_path / "packed", max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    assert (len(list(out.glob("*.safetensors"))) > 1) == bool(max_shard_bytes)
    with pytest.raises(OSError, match="no file named model.safetensors"):
        MixtralForCausalLM.from_pretrained(without_protection(out, tmp_path, rename_weights=False))
    with pytest.raises(OSError, match="no file named model.safetensors"):  # the original config bypasses config.json
        AutoModelForCausalLM.from_pretrained(out, config=model.config)


@pytest.mark.parametrize("loader", [AutoModelForCausalLM, MixtralForCausalLM], ids=["auto", "concrete"])
def test_plain_transformers_refuses_the_gptq_export(mixtral_gptq_export: Path, loader) -> None:
    error, message = transformers_gptq_refusal()
    with gptqmodel_import_guard(), pytest.raises(error, match=message):
        loader.from_pretrained(mixtral_gptq_export)


def test_gptq_export_refuses_transformers_without_its_gptq_integration(mixtral_gptq_export: Path,
                                                                        tmp_path: Path) -> None:
    # a loader that reads config.json but not its quantization_config (as transformers would, were its GPTQ
    # integration to stop requiring optimum) reaches the refusal; without that, no file of transformers' names
    config = json.loads((mixtral_gptq_export / "config.json").read_text())
    del config["quantization_config"]
    copy = tmp_path / "gptq-no-quantization-config"
    shutil.copytree(mixtral_gptq_export, copy)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"eacmoe GPTQ export .*load it with GPTQModel"):
        MixtralForCausalLM.from_pretrained(copy)
    with pytest.raises(OSError, match="no file named model.safetensors"):
        MixtralForCausalLM.from_pretrained(without_protection(copy, tmp_path, rename_weights=False))


def test_lm_eval_hf_refuses_both_exports(mixtral_export, mixtral_gptq_export: Path) -> None:
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        huggingface.HFLM(pretrained=str(mixtral_export[0]), device="cpu", batch_size=1)
    error, message = transformers_gptq_refusal()
    with gptqmodel_import_guard(), pytest.raises(error, match=message):
        huggingface.HFLM(pretrained=str(mixtral_gptq_export), device="cpu", batch_size=1)


def test_check_loaded_names_what_a_loader_made_up(mixtral_export, tmp_path: Path) -> None:
    out, ids, reference = mixtral_export
    runtime = load(out)
    check_loaded(runtime, out)  # the runtime: every tensor from the files
    # packed tensors are buffers: one that a loader left as it built it is named too
    dropped = "model.layers.1.mlp.experts.3.down_proj.qweight"
    (tmp_path / "partial").mkdir()
    stored = load_file(out / f"{PACKED_WEIGHTS_BASENAME}.safetensors")
    save_file({k: v for k, v in stored.items() if k != dropped}, tmp_path / "partial" / "weights.safetensors")
    assert tensors_not_in_checkpoint(runtime, tmp_path / "partial") == [dropped]

    unprotected = without_protection(out, tmp_path, rename_weights=True)
    random_experts = MixtralForCausalLM.from_pretrained(unprotected)  # the load this export used to allow
    with torch.no_grad():
        assert not torch.allclose(random_experts(ids).logits, reference, atol=1e-2)
    assert set(tensors_not_in_checkpoint(random_experts, unprotected)) == quantized_module_tensors(random_experts, out)
    with pytest.raises(ValueError, match=r"not in the weight files .* initialised them itself"):
        check_loaded(random_experts, unprotected)


@pytest.mark.skipif(not (is_optimum_available() and is_gptqmodel_available()), reason="needs optimum and gptqmodel")
def test_check_loaded_catches_transformers_optimum_on_an_unprotected_gptq_export(mixtral_gptq_export: Path,
                                                                                tmp_path: Path) -> None:
    # the original report: transformers + optimum fills the fused experts of a GPTQ MoE with random values
    unprotected = without_protection(mixtral_gptq_export, tmp_path, rename_weights=True)
    with gptqmodel_import_guard():
        model = AutoModelForCausalLM.from_pretrained(unprotected)
    experts = {f"model.layers.{i}.mlp.experts.{p}" for i in range(model.config.num_hidden_layers)
               for p in ("gate_up_proj", "down_proj")}
    assert set(tensors_not_in_checkpoint(model, unprotected)) == experts


TOKENIZER_CHECK = """
import json, sys
from transformers import AutoTokenizer
text, directories = sys.argv[1], sys.argv[2:]
print(json.dumps([AutoTokenizer.from_pretrained(d)(text).input_ids for d in directories]
                 + [AutoTokenizer.from_pretrained(directories[0], trust_remote_code=True)(text).input_ids]))
"""


def test_export_tokenizers_load_without_a_prompt(mixtral_export, mixtral_gptq_export: Path, tokenizer) -> None:
    # AutoTokenizer reads config.json first: with a model_type that transformers did not know it would ask "run
    # the custom code? [y/N]" (stdin closed here: the question is still printed, then the load goes on without it)
    text = "Mixture-of-experts models route each token to a few experts."
    directories = [str(mixtral_export[0]), str(mixtral_gptq_export)]
    proc = subprocess.run([sys.executable, "-c", TOKENIZER_CHECK, text, *directories],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    # the last: transformers' warning when a config class reads another model_type (EacmoeConfig, with remote code)
    for noise in ("custom code", "[y/N]", "You are using a model of type"):
        assert noise not in output, output[-2000:]
    expected = tokenizer(text).input_ids
    assert json.loads(proc.stdout.splitlines()[-1]) == [expected] * 3  # packed, gptq, packed with remote code
