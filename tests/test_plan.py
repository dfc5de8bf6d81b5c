"""Memory planner (`python -m eacmoe.plan`): the paper's Mixtral figures, parameter counts against real
transformers models of every family, the KV-cache closed form against a real cache, and the CLI contract."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_adapters import COMMON, MLA, SPECS
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from eacmoe.adapters import get_adapter
from eacmoe.plan import (
    GB,
    GIB,
    PlanError,
    build_parser,
    bundled_config_names,
    gptq_linear_bytes,
    kv_cache_plan,
    load_config,
    main,
    parse_bits_plan,
    parse_memory,
    plan_memory,
)
from eacmoe.quant import QuantizedWeight
from eacmoe.quant.packing import pack_gptq

REPO = Path(__file__).resolve().parent.parent


def plan_for(name: str, bits: str, attn_bits: str | None = None, **kwargs):
    config, source = load_config(name)
    return plan_memory(config, parse_bits_plan(bits, attn_bits, 128, config.num_hidden_layers), model=name,
                       source=source, **kwargs)


# ------------------------------------------------------------------------------------------------ the paper
def test_mixtral_fp16_matches_the_paper_in_gb_not_gib():
    plan = plan_for("mixtral-8x7b", "16")
    assert plan.parameters == 46_702_792_704
    assert plan.weights.total / GB == pytest.approx(93.41, rel=0.01)
    assert abs(plan.weights.total / GIB - 93.41) / 93.41 > 0.05  # so the paper's GB is 1e9 bytes
    assert plan.paper_average_bits is None and plan.weights.quantized_params == 0


def test_mixtral_qesc_3bit_matches_the_paper():
    plan = plan_for("mixtral-8x7b", "3", "4")
    assert plan.weights.total / GB == pytest.approx(18.98, rel=0.05)
    assert round(plan.paper_average_bits, 2) == 3.03
    assert plan.paper_gb == 18.98
    # the overhead is itemised: scales and zero points of every group, g_idx of every input column
    experts = plan.components["routed_experts"]
    assert experts.scales == 256 * (32 * 14336 + 32 * 14336 + 112 * 4096) * 2
    assert experts.g_idx == 256 * (4096 + 4096 + 14336) * 4
    assert plan_for("mixtral-8x7b", "3.03").weights.total == plan.weights.total  # the paper's label works too


@pytest.mark.parametrize("label,average", [("2.06", 2.06), ("2.54", 2.54)])
def test_mixtral_paper_bit_labels(label, average):
    assert round(plan_for("mixtral-8x7b", label).paper_average_bits, 2) == average


# Published sizes (model cards / papers, in billions of parameters).
PUBLISHED_B = {
    "mixtral-8x7b": 46.7, "mixtral-8x22b": 140.6, "qwen1.5-moe-a2.7b": 14.3, "qwen3-30b-a3b": 30.5,
    "deepseek-v2-lite": 15.7, "phi-3.5-moe": 41.9, "olmoe-1b-7b": 6.9,
}


def test_bundled_configs_have_their_published_sizes():
    assert set(bundled_config_names()) == set(PUBLISHED_B)
    for name, billions in PUBLISHED_B.items():
        config, _ = load_config(name)
        assert get_adapter(config).count_parameters(config) / 1e9 == pytest.approx(billions, abs=0.06), name


# ------------------------------------------------------------------------------------ counts vs real models
VARIANTS = {
    "mixtral_tied": lambda: MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True,
    ),
    "qwen2_moe_no_qkv_bias": lambda: Qwen2MoeConfig(
        **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=40,
        qkv_bias=False, decoder_sparse_step=2,
    ),
    "qwen3_moe_bias": lambda: Qwen3MoeConfig(
        **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, attention_bias=True, head_dim=24,
        mlp_only_layers=[0],
    ),
    "olmoe_bias": lambda: OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, attention_bias=True),
    "deepseek_v2_biases": lambda: DeepseekV2Config(
        **MLA, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=2,
        first_k_dense_replace=2, q_lora_rank=24, attention_bias=True, mlp_bias=True, topk_method="greedy",
    ),
    "deepseek_v3_bias": lambda: DeepseekV3Config(
        **MLA, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
        first_k_dense_replace=0, q_lora_rank=None, attention_bias=True, n_group=2, topk_group=1,
    ),
    "phimoe_biases": lambda: PhimoeConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
    ),
}
CONFIG_FACTORIES = {**{name: spec.make_config for name, spec in SPECS.items()}, **VARIANTS}


@pytest.mark.parametrize("name", sorted(CONFIG_FACTORIES))
def test_parameter_count_equals_a_real_model(name):
    config = CONFIG_FACTORIES[name]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    adapter = get_adapter(config)
    assert adapter.count_parameters(config) == sum(p.numel() for p in model.parameters())

    # Stronger: every non-expert tensor by name and shape, the fused experts by element count per layer,
    # and the persistent buffers (DeepSeek-V3's correction bias) as non-parameters.
    inventory = adapter.weight_inventory(config)
    full = lambda s: s.name if s.layer is None else f"model.layers.{s.layer}.{s.name}"  # noqa: E731
    ours = {full(s): s.shape for s in inventory if s.component != "routed_experts" and s.parameter}
    theirs = {n: tuple(p.shape) for n, p in model.named_parameters() if ".experts." not in n}
    assert ours == theirs
    for layer in range(config.num_hidden_layers):
        ours_experts = sum(s.numel for s in inventory if s.component == "routed_experts" and s.layer == layer)
        theirs_experts = sum(p.numel() for n, p in model.named_parameters() if f"layers.{layer}.mlp.experts." in n)
        assert ours_experts == theirs_experts
    buffers = {full(s): s.shape for s in inventory if not s.parameter}
    real_buffers = {n: tuple(b.shape) for n, b in model.named_buffers() if "rotary_emb" not in n}
    assert buffers == real_buffers


def test_planner_on_a_local_checkpoint_directory(tmp_path):
    config = SPECS["deepseek_v2"].make_config()
    config.save_pretrained(tmp_path)
    loaded, source = load_config(str(tmp_path))
    plan = plan_memory(loaded, parse_bits_plan("2", None, 16, loaded.num_hidden_layers))
    assert source.startswith("directory") and plan.parameters == get_adapter(config).count_parameters(config)
    assert set(plan.components) >= {"dense_mlp", "shared_experts", "routed_experts", "attention"}


# ----------------------------------------------------------------------------------------- storage formulas
@pytest.mark.parametrize(
    "bits,out_f,in_f,group", [(2, 64, 256, 64), (3, 64, 256, 128), (4, 96, 128, -1), (8, 20, 48, 16)]
)
def test_gptq_linear_bytes_equal_the_packed_tensors(bits, out_f, in_f, group):
    n_groups = 1 if group == -1 else in_f // group
    qw = QuantizedWeight(
        codes=torch.zeros(out_f, in_f, dtype=torch.uint8), scales=torch.ones(out_f, n_groups),
        zeros=torch.zeros(out_f, n_groups, dtype=torch.uint8),
        g_idx=torch.arange(in_f, dtype=torch.int32) // (in_f if group == -1 else group), bits=bits,
        group_size=group, sym=False,
    )
    packed = pack_gptq(qw)
    planned = gptq_linear_bytes(out_f, in_f, bits, group)
    nbytes = {name: t.numel() * t.element_size() for name, t in packed.items()}
    assert (planned.codes, planned.zeros, planned.scales, planned.g_idx) == (
        nbytes["qweight"], nbytes["qzeros"], nbytes["scales"], nbytes["g_idx"])


def test_kv_cache_closed_form_small_case():
    config = MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)  # 3 layers, 2 KV heads x 16
    kv = kv_cache_plan(config, get_adapter(config), batch=2, context=10)
    assert kv.bytes == 3 * 2 * 10 * (2 * 2 * 16) * 2  # layers x batch x tokens x (K+V x heads x head_dim) x fp16
    mla = SPECS["deepseek_v2"].make_config()  # kv_lora_rank 16 + rope 8, 3 layers
    assert kv_cache_plan(mla, get_adapter(mla), batch=2, context=10).bytes == 3 * 2 * 10 * (16 + 8) * 2
    windowed = MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)
    assert kv_cache_plan(windowed, get_adapter(windowed), batch=2, context=10).bytes == 3 * 2 * 4 * 64 * 2


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v3"])
def test_kv_cache_matches_the_cache_transformers_allocates(name):
    config = SPECS[name].make_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    batch, context = 2, 7
    with torch.no_grad():
        cache = model(torch.randint(3, 100, (batch, context)), use_cache=True).past_key_values
    cached_values = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    assert kv_cache_plan(config, get_adapter(config), batch, context).bytes == cached_values * 2


def test_two_and_a_half_bits_is_per_layer():
    plan = parse_bits_plan("2.5", None, 128, 4)
    assert plan.expert_bits == (3, 3, 2, 2) and plan.attn_bits == 4
    assert parse_bits_plan("16", None, 128, 4).attn_bits is None
    assert parse_bits_plan("16", "4", 128, 4).attn_bits == 4
    assert parse_bits_plan("2,3,4,8", "16", -1, 4).expert_bits == (2, 3, 4, 8)


@pytest.mark.parametrize("bits,attn,group", [("5", None, 128), ("2.7", None, 128), ("2,3", None, 128),
                                             ("3", "6", 128), ("3", "x", 128), ("3", None, 0)])
def test_bad_bits_are_rejected(bits, attn, group):
    with pytest.raises(PlanError):
        parse_bits_plan(bits, attn, group, 4)


def test_parse_memory_units():
    assert parse_memory("24") == 24 * GB
    assert parse_memory("24GB") == parse_memory("24 gb") == 24 * GB
    assert parse_memory("24GiB") == 24 * GIB
    assert parse_memory("1.5TB") == 1_500_000_000_000
    for bad in ("", "24 GiBs", "-1GB", "lots"):
        with pytest.raises(PlanError):
            parse_memory(bad)


# ------------------------------------------------------------------------------------------------------ CLI
def test_help_explains_every_flag():
    for action in build_parser()._actions:
        assert action.help, action.dest


def _one_error_line(err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err


@pytest.mark.parametrize("argv,needle", [
    (["--model", "no-such-config"], "unknown config"),
    (["--model", "nobody/no-such-model"], "cannot load config"),  # offline in tests (conftest)
    (["--bits", "5"], "bits"),
    (["--bits", "3,3"], "layers"),
    (["--attn-bits", "6"], "--attn-bits"),
    (["--gpu-memory", "lots"], "memory size"),
    (["--batch", "0"], "--batch"),
    (["--group-size", "abc"], "--group-size"),
])
def test_bad_input_is_a_one_line_error_with_exit_code_2(argv, needle, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse-level errors
        code = exc.code
    assert code == 2
    _one_error_line(capsys.readouterr().err, needle)


def test_unsupported_family_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert main(["--model", str(tmp_path)]) == 2
    _one_error_line(capsys.readouterr().err, "not supported")


def _mixtral_config_file(tmp_path, **changes) -> str:
    fields = json.loads((REPO / "eacmoe" / "assets" / "configs" / "mixtral-8x7b.json").read_text())
    fields.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    return str(path)


@pytest.mark.parametrize("changes,needle", [
    ({"hidden_size": -4096}, "every size must be positive"),
    ({"intermediate_size": 0}, "every size must be positive"),
    ({"vocab_size": -1}, "every size must be positive"),
    ({"num_local_experts": 0}, "0 routed experts"),
    ({"num_experts_per_tok": 9}, "9 of 8 experts"),
    ({"num_experts_per_tok": 0}, "0 of 8 experts"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"model_type": "foobar"}, "unknown model_type 'foobar'"),
])
def test_a_config_that_describes_no_model_is_refused(tmp_path, capsys, changes, needle):
    assert main(["--model", _mixtral_config_file(tmp_path, **changes)]) == 2
    captured = capsys.readouterr()
    _one_error_line(captured.err, needle)
    assert len(captured.err) < 400 and "FITS" not in captured.out  # the unknown type was a ~10 KB line


def test_the_bundled_models_of_quantize_are_known(capsys):
    from safetensors import safe_open

    from eacmoe.assets import BUNDLED_MODELS, bundled_model_path

    for name in BUNDLED_MODELS:
        with safe_open(str(bundled_model_path(name) / "model.safetensors"), "pt") as f:
            stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        assert main(["--model", name, "--group-size", "64", "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert plan["parameters"] == stored and plan["source"] == f"bundled model {name}"


def test_group_size_is_refused_exactly_as_quantize_refuses_it(tmp_path, capsys):
    from eacmoe.quantize import main as quantize_main

    assert main(["--model", "tiny-mixtral", "--group-size", "7"]) == 2
    planned = capsys.readouterr().err
    _one_error_line(planned, "--group-size 7 does not divide")
    assert quantize_main(["--model", "tiny-mixtral", "--group-size", "7", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == planned.strip()
    assert main(["--model", "tiny-mixtral", "--group-size", "64"]) == 0  # a divisor of 256 passes both


def test_table_output_names_the_overheads(capsys):
    assert main(["--model", "mixtral-8x7b", "--bits", "3", "--attn-bits", "4"]) == 0
    out = capsys.readouterr().out
    for needle in ("scales", "zeros", "g_idx", "routed_experts", "KV cache", "FITS", "18.98 GB", "GiB"):
        assert needle in out, needle


def test_cli_json_as_a_module():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "eacmoe.plan", "--model", "mixtral-8x7b", "--bits", "16", "--json", "--batch", "4",
         "--context", "512", "--gpu-memory", "24GiB"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    assert plan["weights"]["total_gb"] == pytest.approx(93.41, rel=0.01)
    assert plan["gpu_bytes"] == 24 * GIB and plan["fits"] is False
    assert plan["kv_cache"]["bytes"] == 32 * 4 * 512 * (2 * 8 * 128) * 2
    assert plan["parameters"] == 46_702_792_704
