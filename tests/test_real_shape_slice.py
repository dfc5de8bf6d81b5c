"""scripts/make_real_shape_slice.py: the synthetic real-shape checkpoints (they measure cost, not accuracy) have the
hub's keys and the shapes transformers' own model of the config expects, load with from_pretrained and with the
lazy loader, run, and are quantizable. The full-size slices are checked on the meta device only (no memory)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent

TINY = {  # small dimensions through the same code path (--set)
    "mixtral-8x7b": {"hidden_size": 64, "intermediate_size": 96, "num_local_experts": 4, "num_attention_heads": 4,
                     "num_key_value_heads": 2},
    "qwen3-30b-a3b": {"hidden_size": 64, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32},
}


def _script():
    spec = importlib.util.spec_from_file_location("make_real_shape_slice", REPO / "scripts" / "make_real_shape_slice.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_real_shape_slice"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=list(TINY))
def tiny_slice(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    out = tmp_path_factory.mktemp("slices") / family
    # a tiny shard limit: several shards, so the index really maps keys to files
    assert _script().main(["--family", family, "--out", str(out), "--max-shard-gb", str(300e3 / 2**30)]
                          + [f"--set={k}={v}" for k, v in TINY[family].items()]) == 0
    return family, out


def test_full_size_layout_has_the_hub_keys_and_shapes() -> None:
    """Against the published checkpoints' index (keys and shapes written here from the hub, not from our config)."""
    script = _script()
    mixtral = script.hub_layout(script.slice_config("mixtral-8x7b", 1, {}))
    expected = {"model.layers.0.block_sparse_moe.experts.7.w1.weight": (14336, 4096),
                "model.layers.0.block_sparse_moe.experts.7.w2.weight": (4096, 14336),
                "model.layers.0.block_sparse_moe.experts.7.w3.weight": (14336, 4096),
                "model.layers.0.block_sparse_moe.gate.weight": (8, 4096),
                "model.layers.0.self_attn.q_proj.weight": (4096, 4096),
                "model.layers.0.self_attn.k_proj.weight": (1024, 4096),
                "model.layers.0.input_layernorm.weight": (4096,),
                "model.embed_tokens.weight": (8192, 4096), "lm_head.weight": (8192, 4096)}
    assert {k: tuple(mixtral[k].shape) for k in expected} == expected
    assert len(mixtral) == 3 + 7 + 8 * 3  # embed, norm, head; attention 4, norms 2, gate; 8 experts x 3
    assert all(t.dtype == torch.bfloat16 for t in mixtral.values())
    layer = sum(t.numel() for k, t in mixtral.items() if k.startswith("model.layers.0.")) * 2
    # 8 experts x 3 x 14336 x 4096, attention 4096 x (4096 + 2 x 1024 + 4096), router 8 x 4096, 2 norms; bfloat16
    assert layer == 2 * (8 * 3 * 14336 * 4096 + 4096 * (4096 + 2 * 1024 + 4096) + 8 * 4096 + 2 * 4096)

    qwen = script.hub_layout(script.slice_config("qwen3-30b-a3b", 1, {}))
    expected = {"model.layers.0.mlp.experts.127.gate_proj.weight": (768, 2048),
                "model.layers.0.mlp.experts.127.up_proj.weight": (768, 2048),
                "model.layers.0.mlp.experts.127.down_proj.weight": (2048, 768),
                "model.layers.0.mlp.gate.weight": (128, 2048),
                "model.layers.0.self_attn.q_proj.weight": (4096, 2048),
                "model.layers.0.self_attn.o_proj.weight": (2048, 4096),
                "model.layers.0.self_attn.k_proj.weight": (512, 2048),
                "model.layers.0.self_attn.q_norm.weight": (128,)}
    assert {k: tuple(qwen[k].shape) for k in expected} == expected
    assert len(qwen) == 3 + 9 + 128 * 3  # attention 4, q/k norms 2, norms 2, gate; 128 experts x 3


def test_slice_loads_with_transformers_and_matches_its_model(tiny_slice) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    family, path = tiny_slice
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    hub_expert_key = {"mixtral-8x7b": "model.layers.1.block_sparse_moe.experts.3.w2.weight",
                      "qwen3-30b-a3b": "model.layers.1.mlp.experts.7.gate_proj.weight"}[family]
    assert hub_expert_key in index["weight_map"]
    total = 0
    for shard in shards:
        with safe_open(str(path / shard), framework="pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
            for key in f.keys():
                t = f.get_tensor(key)
                assert t.dtype == torch.bfloat16
                total += t.numel() * 2
    assert total == index["metadata"]["total_size"]

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert model.dtype == torch.bfloat16 and config.vocab_size == 8192

    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("norm.weight"):
            assert bool((value == 1).all()), key
        elif value.numel() >= 4096:  # the family's init std (initializer_range) for every matrix, routers too
            assert abs(value.float().std().item() / config.initializer_range - 1) < 0.1, key
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 16, config.vocab_size) and bool(torch.isfinite(logits).all())
    assert logits.float().std() > 0


def test_slice_loads_lazily_layer_equal_to_from_pretrained(tiny_slice) -> None:
    from transformers import AutoModelForCausalLM

    from eacmoe.lazy_loading import LayerLoader

    _, path = tiny_slice
    model = AutoModelForCausalLM.from_pretrained(path)
    loader = LayerLoader(path)
    assert loader.dtype == torch.bfloat16 and loader.num_layers == 2
    for index in range(2):
        lazy = loader.load(index).state_dict()
        full = model.model.layers[index].state_dict()
        assert lazy.keys() == full.keys()
        for key in full:
            assert torch.equal(lazy[key], full[key]), (index, key)


def test_slice_is_quantizable(tiny_slice, tmp_path) -> None:
    from eacmoe.workflow import QuantizeJob, run_job

    family, path = tiny_slice
    report = run_job(QuantizeJob(model=str(path), method="qesc", bits="2", group_size=32, nsamples=4, seqlen=32,
                                 router_steps=5, eval_samples=2, eval_seqlen=16, lazy=True, threads=1,
                                 out=str(tmp_path / "q")))
    assert report["lazy_loading"] is True
    assert (tmp_path / "q" / "report.json").is_file()


def test_same_seed_same_tensors_and_bad_requests(tmp_path, capsys) -> None:
    script = _script()
    a = script.write_slice("qwen3-30b-a3b", tmp_path / "a", 1, TINY["qwen3-30b-a3b"], seed=3)
    script.write_slice("qwen3-30b-a3b", tmp_path / "b", 1, TINY["qwen3-30b-a3b"], seed=3, max_shard_bytes=10**5)
    assert a["parameters"] == json.loads((tmp_path / "b" / "slice.json").read_text())["parameters"]
    from transformers import AutoModelForCausalLM
    sa = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    sb = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # a tensor does not depend on the shard plan
    assert "cost" in (tmp_path / "a" / "README.md").read_text()
    capsys.readouterr()
    assert script.main(["--family", "qwen3-30b-a3b", "--out", str(tmp_path / "a")]) == 2  # exists
    assert script.main(["--family", "qwen3-30b-a3b", "--out", str(tmp_path / "c"), "--set", "no_such_field=1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err[0].startswith("error: ") and "exists" in err[0] and "no_such_field" in err[1]
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()


_PEAK = textwrap.dedent("""
    import json, resource, sys
    sys.argv = ["x"]
    import importlib.util
    spec = importlib.util.spec_from_file_location("s", sys.argv[0] if False else {script!r})
    s = importlib.util.module_from_spec(spec); spec.loader.exec_module(s)
    s.write_slice("mixtral-8x7b", __import__("pathlib").Path({out!r}), 1, {{"hidden_size": 64, "intermediate_size": 64,
                  "num_local_experts": 2, "num_attention_heads": 4, "num_key_value_heads": 2}})  # warm-up: imports
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info = s.write_slice("mixtral-8x7b", __import__("pathlib").Path({out!r}), 1, {{"hidden_size": 1024,
                         "intermediate_size": 8192, "num_local_experts": 8, "num_attention_heads": 8,
                         "num_key_value_heads": 2}}, overwrite=True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"layer_bytes": info["layer_bytes"], "increase": (after - before) * 1024,
                      "block": s.BLOCK_BYTES}}))
""")


def test_writer_streams_tensor_by_tensor(tmp_path) -> None:
    """A 0.42 GB layer is written with a peak RSS increase of a few row blocks (64 MiB fp32 each), far below the
    layer: building the state dict first (the old way, save_pretrained) holds the whole layer."""
    code = _PEAK.format(script=str(REPO / "scripts" / "make_real_shape_slice.py"), out=str(tmp_path / "big"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["layer_bytes"] > 400e6
    assert measured["increase"] < 3 * measured["block"], measured
