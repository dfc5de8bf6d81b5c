"""Lazy, layer-at-a-time loading: bit-identical to from_pretrained, and a lazy quantization run equals an
in-memory one (weights, quantized state, evaluation, output loadable with from_pretrained)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

from eacmoe import workflow
from eacmoe.assets import TOKENIZER_DIR
from eacmoe.lazy_loading import CheckpointLayers, LayerLoader, checkpoint_files
from eacmoe.pipeline import LayerwiseQuantizer, ModelLayers, QuantizeConfig, progress_layer_file, read_progress_layer
from eacmoe.weight_scan import NonFiniteWeightsError, check_finite, scan_weights
from eacmoe.quantize import build_parser
from eacmoe.workflow import JobError, QuantizeJob, run_job
from tiny_models import FAMILY_NAMES, VOCAB, build

torch.set_num_threads(1)


def save(model, path: Path, sharded: bool = False) -> Path:
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "50GB")
    return path


def all_checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in checkpoint_files(directory):
        tensors.update(load_file(file))
    return tensors


def exported_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export's safetensors files (the packed format does not use transformers' file names)."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# -- materialisation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_layers_identical_to_from_pretrained(name: str, sharded: bool, tmp_path: Path) -> None:
    model, _ = build(name)
    path = save(model, tmp_path / name, sharded)
    keys = all_checkpoint_tensors(path).keys()
    # save_pretrained wrote the legacy per-expert layout, so the loader really had to fuse experts
    legacy = "block_sparse_moe.experts.0.w1.weight" if name == "mixtral" else "mlp.experts.0.gate_proj.weight"
    assert any(k.endswith(legacy) for k in keys) and not any("gate_up_proj" in k for k in keys)
    assert (len(checkpoint_files(path)) > 1) == sharded

    loader = LayerLoader(path, torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    for i in range(loader.num_layers):
        layer = loader.load(i)
        assert_same_state(layer.state_dict(), reference.model.layers[i].state_dict())
        loader.release(layer)
        assert all(p.is_meta for p in layer.parameters())
    # outside the layers everything is real and identical, rotary buffers included; the layers stay on meta
    buffers = dict(reference.named_buffers())
    for key, value in list(loader.model.state_dict().items()) + list(loader.model.named_buffers()):
        if key.startswith("model.layers."):
            assert value.is_meta, key
        else:
            assert torch.equal(value, reference.state_dict().get(key, buffers.get(key))), key


@pytest.mark.parametrize("name", sorted(set(FAMILY_NAMES) - {"mixtral", "qwen2_moe"}))
def test_other_families_identical(name: str, tmp_path: Path) -> None:
    model, _ = build(name)
    path = save(model, tmp_path / name)
    loader = LayerLoader(path, torch.float32)
    for i, ref_layer in enumerate(model.model.layers):
        assert_same_state(loader.load(i).state_dict(), ref_layer.state_dict())


def test_tied_embeddings_and_bf16_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, tie_word_embeddings=True)
    path = save(MixtralForCausalLM(cfg).to(torch.bfloat16), tmp_path / "tied")
    loader = LayerLoader(path, torch.float32)
    assert loader.model.lm_head.weight is loader.model.model.embed_tokens.weight
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert torch.equal(loader.model.lm_head.weight, reference.lm_head.weight)
    assert_same_state(loader.load(1).state_dict(), reference.model.layers[1].state_dict())
    assert "lm_head.weight" not in loader.non_layer_checkpoint_tensors()  # save_pretrained drops tied copies


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_written_back_in_checkpoint_layout(name: str, tmp_path: Path) -> None:
    """checkpoint_tensors undoes the expert fusion exactly as save_pretrained does."""
    model, _ = build(name)
    path = save(model, tmp_path / name)
    on_disk = all_checkpoint_tensors(path)
    loader = LayerLoader(path, torch.float32)
    written = loader.non_layer_checkpoint_tensors()
    for i in range(loader.num_layers):
        written.update(loader.checkpoint_tensors(i, loader.load(i).state_dict()))
    assert_same_state(written, on_disk)


# -- quantization -------------------------------------------------------------------------------------
def calib_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))


def quantize_config(n_layers: int) -> QuantizeConfig:
    return QuantizeConfig(expert_bits=[2] * n_layers, method="qesc", group_size=8, router_steps=10, batch_size=2)


def lazy_quantizer(path: Path, progress: Path) -> LayerwiseQuantizer:
    loader = LayerLoader(path, torch.float32)
    return LayerwiseQuantizer(loader.model, quantize_config(loader.num_layers), progress_dir=progress,
                              layer_source=CheckpointLayers(loader))


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_lazy_quantizer_equals_in_memory_and_resumes(name: str, tmp_path: Path) -> None:
    model, _ = build(name)
    path = save(model, tmp_path / "ckpt", sharded=True)
    in_memory = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    reference = LayerwiseQuantizer(in_memory, quantize_config(len(in_memory.model.layers)))
    reference.run(calib_ids())

    full = lazy_quantizer(path, tmp_path / "full")
    full.run(calib_ids())
    assert not full.quantized  # nothing kept in memory between layers
    assert all(p.is_meta for p in full.layers.parameters())
    assert full.quantized_shapes == reference.quantized_shapes
    for i, layer in enumerate(in_memory.model.layers):
        state, _ = read_progress_layer(tmp_path / "full", i)
        assert_same_state(state, layer.state_dict())

    lazy_quantizer(path, tmp_path / "resumed").run(calib_ids(), stop_after_layer=0)  # "crash" after layer 0
    resumed = lazy_quantizer(path, tmp_path / "resumed")
    resumed.run(calib_ids(), resume=True)
    assert [r.layer for r in resumed.reports] == list(range(len(in_memory.model.layers)))
    assert resumed.quantized_shapes == reference.quantized_shapes
    for i in range(len(in_memory.model.layers)):
        assert_same_state(load_file(progress_layer_file(tmp_path / "resumed", i)),
                          load_file(progress_layer_file(tmp_path / "full", i)))


def tiny_job_checkpoint(path: Path, nan_in_layer: int | None = None) -> Path:
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=8192, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                        num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg)
    if nan_in_layer is not None:
        with torch.no_grad():
            model.model.layers[nan_in_layer].mlp.experts.down_proj[1, 0, 0] = float("nan")
    save(model, path)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


FAST_JOB = dict(nsamples=4, seqlen=32, eval_samples=2, eval_seqlen=32, group_size=32, router_steps=5)


def test_lazy_flag() -> None:
    assert build_parser().parse_args([]).lazy is None  # decided by size
    assert build_parser().parse_args(["--lazy"]).lazy is True
    assert build_parser().parse_args(["--no-lazy"]).lazy is False


def test_lazy_job_refuses_nan_weights_before_the_first_layer(tmp_path: Path, monkeypatch) -> None:
    path = tiny_job_checkpoint(tmp_path / "nan", nan_in_layer=1)  # the last layer: found only at its turn before
    quantized_layers = []
    monkeypatch.setattr(LayerwiseQuantizer, "quantize_layer", lambda self, i, *a: quantized_layers.append(i))
    with pytest.raises(JobError, match=r"model\.layers\.1\.mlp\.experts\.down_proj holds NaN"):
        run_job(QuantizeJob(model=str(path), **FAST_JOB, out=str(tmp_path / "o"), lazy=True))
    assert quantized_layers == []
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_check_finite_finds_every_nan_and_inf_and_only_those(dtype: torch.dtype) -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        weight = torch.randn(64, 48).to(dtype)
        weight[17, 5] = bad
        with pytest.raises(NonFiniteWeightsError, match="w holds NaN or Inf"):
            check_finite([("w", weight)])
    # finite values whose sum overflows (the fast path's false alarm) are not refused
    check_finite([("large", torch.full((64, 48), torch.finfo(dtype).max / 2, dtype=dtype))])
    check_finite([("ints", torch.full((4,), 2**40, dtype=torch.int64))])


def test_fingerprint_is_the_weights_not_the_loading(tmp_path: Path) -> None:
    """The same checkpoint gives the same fingerprint read lazily or whole and from a copy elsewhere (so --resume
    may switch --lazy), another checkpoint of the same architecture, or one changed tensor, another one."""
    path = tiny_job_checkpoint(tmp_path / "a")
    shutil.copytree(path, tmp_path / "copy")

    def lazy(p: Path) -> str:
        loader = LayerLoader(p, torch.float32)
        return scan_weights(loader.model, CheckpointLayers(loader)).fingerprint

    def in_memory(model) -> str:
        return scan_weights(model, ModelLayers(model.model.layers)).fingerprint

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    fingerprint = in_memory(model)
    assert lazy(path) == fingerprint == lazy(tmp_path / "copy")
    other = MixtralForCausalLM(model.config)  # same config, freshly initialised weights
    assert in_memory(other) != fingerprint
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(1.01)
    changed = in_memory(model)
    assert changed != fingerprint
    assert in_memory(model.to(torch.bfloat16)) != changed  # another --dtype computes other results


def test_resume_may_switch_between_lazy_and_in_memory(tmp_path: Path, caplog) -> None:
    model, _ = build("mixtral")
    path = save(model, tmp_path / "ckpt")
    in_memory = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    cfg = quantize_config(len(in_memory.model.layers))
    LayerwiseQuantizer(in_memory, cfg, progress_dir=tmp_path / "p").run(calib_ids(), stop_after_layer=0)
    resumed = lazy_quantizer(path, tmp_path / "p")
    assert resumed.resumable_layers(calib_ids()) == 1
    state_file = tmp_path / "p" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "threads": 99}))
    resumed.run(calib_ids(), resume=True)
    assert any("computed with 99 torch threads" in r.getMessage() for r in caplog.records)
    full = lazy_quantizer(path, tmp_path / "full")
    full.run(calib_ids())
    for i in range(len(in_memory.model.layers)):
        assert_same_state(load_file(progress_layer_file(tmp_path / "p", i)),
                          load_file(progress_layer_file(tmp_path / "full", i)))
    # starting over (resume=False) discards the finished progress, and says so
    lazy_quantizer(path, tmp_path / "p").run(calib_ids(), stop_after_layer=0)
    layers = len(cfg.expert_bits)
    assert any(r.levelname == "WARNING" and f"discarding the progress of {layers} of {layers} layers" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("fmt", ["packed", "dequantized"])
def test_lazy_job_equals_in_memory_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    path = tiny_job_checkpoint(tmp_path / "tiny")
    monkeypatch.setattr(workflow, "LAZY_AUTO_BYTES", 0)  # lazy=None: every model counts as large
    reports = {lazy: run_job(QuantizeJob(model=str(path), **FAST_JOB, out=str(tmp_path / f"lazy-{lazy}"), lazy=lazy,
                                         format=fmt))
               for lazy in (False, None)}
    reports[True] = reports.pop(None)
    eager_out, lazy_out = tmp_path / "lazy-False", tmp_path / "lazy-None"

    assert reports[True]["lazy_loading"] and not reports[False]["lazy_loading"]
    assert reports[True]["evaluation"] == reports[False]["evaluation"]
    assert reports[True]["average_bits_true"] == reports[False]["average_bits_true"]
    assert_same_state(exported_tensors(lazy_out), exported_tensors(eager_out))
    assert json.loads((lazy_out / "config.json").read_text()) == json.loads((eager_out / "config.json").read_text())
    if fmt == "packed":
        kwargs = {"trust_remote_code": True}
        assert (lazy_out / "eacmoe_manifest.json").read_text() == (eager_out / "eacmoe_manifest.json").read_text()
    else:
        kwargs = {"output_loading_info": True}
        assert {p.name for p in eager_out.iterdir()} - {"model.safetensors"} <= {p.name for p in lazy_out.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(lazy_out, **kwargs)
    if fmt == "dequantized":
        loaded, info = loaded
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        kwargs = {}
    assert_same_state(loaded.state_dict(), AutoModelForCausalLM.from_pretrained(eager_out, **kwargs).state_dict())


def test_weight_sample_of_a_real_size_tensor_stays_in_bounds() -> None:
    """A Qwen3-30B-A3B fused expert tensor has 201,326,592 elements: float32 positions rounded the last one past
    the end (IndexError at the first real-shape run). 2**25 + 4 elements show the same rounding; the sample ends
    at the last element. Below 2**24 elements the positions are the float32 ones the saved fingerprints used."""
    from eacmoe.weight_scan import SAMPLES_PER_TENSOR, _sample

    n = 2**25 + 4
    assert round(float(torch.tensor(n - 1, dtype=torch.float32))) > n - 1  # the float32 rounding in question
    big = torch.arange(n, dtype=torch.int32)
    sample = torch.frombuffer(bytearray(_sample(big)), dtype=torch.int32)
    assert sample.numel() == SAMPLES_PER_TENSOR and sample[0] == 0 and sample[-1] == n - 1
    assert bool((sample[1:] > sample[:-1]).all())
    small = torch.arange(5000, dtype=torch.int32)
    expected = small[torch.linspace(0, 4999, SAMPLES_PER_TENSOR).round().long()]
    assert _sample(small) == expected.numpy().tobytes()


def _mapped_files() -> dict[str, int]:
    """kB of resident pages per mapped .safetensors file of this process (/proc/self/smaps)."""
    resident: dict[str, int] = {}
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and ":" not in fields[0]:
            current = fields[5] if len(fields) > 5 and fields[5].endswith(".safetensors") else None
        elif current and fields[0] == "Rss:":
            resident[current] = resident.get(current, 0) + int(fields[1])
    return resident


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_loaded_layers_do_not_keep_the_checkpoint_mapped(name: str, tmp_path: Path) -> None:
    """Tensors transformers loads unconverted come back from safetensors as views of the mapped shard; the loader
    copies them, so neither a layer nor the skeleton keeps the file mapped (and its pages resident)."""
    model, _ = build(name)
    path = save(model, tmp_path / "ckpt")
    loader = LayerLoader(path)
    layer = loader.load(0)
    tensors = [*layer.parameters(), *layer.buffers(), *loader.model.parameters(), *loader.model.buffers()]
    assert all(t.is_meta or t.untyped_storage().resizable() for t in tensors)
    assert not _mapped_files()
    reference = AutoModelForCausalLM.from_pretrained(path).model.layers[0].state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in layer.state_dict().items())
