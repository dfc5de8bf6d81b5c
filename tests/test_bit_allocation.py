"""`--bits auto:B`: the knapsack against brute force, the budget held exactly with real parameter counts, a sensitive
layer gets more bits, the sensitivity file is read and checked, and a per-layer schedule round-trips through the
packed and GPTQ exports."""
from __future__ import annotations

import itertools
import json
import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from eacmoe.bit_allocation import (
    AllocationError,
    allocate_bits,
    allocation_from_sensitivities,
    layer_expert_params,
    parse_auto_budget,
    predicted_losses,
    read_sensitivity_file,
)
from eacmoe.export import gptq_quantize_config
from test_export import export, load
from test_pipeline import calib_ids, quantize
from tiny_models import build

torch.set_num_threads(1)


def brute_force(params, losses, budget) -> float:
    """The least total loss over every assignment within the budget (the reference)."""
    choices = sorted(losses[0])
    best = float("inf")
    for bits in itertools.product(choices, repeat=len(params)):
        if sum(p * b for p, b in zip(params, bits)) <= budget * sum(params):
            best = min(best, sum(table[b] for table, b in zip(losses, bits)))
    return best


@pytest.mark.parametrize("case", range(60))
def test_knapsack_is_optimal_and_within_budget_exactly(case: int) -> None:
    rng = random.Random(case)
    layers = rng.randint(1, 6)
    params = [rng.choice([1, 2, 3, 5, 8, 13, 64, 96]) * rng.randint(1, 4) for _ in range(layers)]
    losses = []
    for _ in range(layers):
        a = rng.uniform(0.0, 1.0)
        losses.append({2: a, 3: a * rng.uniform(0.05, 1.0), 4: a * rng.uniform(0.0, 0.05)})
    budget = Fraction(rng.choice(["2", "2.25", "2.5", "2.75", "3", "3.3", "4"]))
    bits = allocate_bits(params, losses, budget)
    assert sum(p * b for p, b in zip(params, bits)) <= budget * sum(params)
    assert sum(t[b] for t, b in zip(losses, bits)) == pytest.approx(brute_force(params, losses, budget), rel=1e-12,
                                                                    abs=1e-15)


def test_budget_is_met_exactly_with_real_parameter_counts() -> None:
    """tiny-qwen-moe-like layers of unequal size (a dense layer among MoE layers): the average over the expert
    weights never exceeds B, and with enough sensitivity everywhere it uses the budget to within one layer."""
    params = [3 * 256 * 512, *[32 * 3 * 256 * 64 + 3 * 256 * 256] * 7]
    for spec in ("auto:2.25", "auto:2.5", "auto:3"):
        allocation = allocation_from_sensitivities(spec, params, [1.0] * 8, "test")
        budget = parse_auto_budget(spec)
        used = sum(p * b for p, b in zip(params, allocation.bits))
        assert used <= budget * sum(params)
        assert budget * sum(params) - used < max(params)  # nothing left that would buy another bit
        assert allocation.achieved_average == pytest.approx(used / sum(params))


def test_a_layer_made_sensitive_gets_more_bits() -> None:
    params = [100] * 8
    flat = allocation_from_sensitivities("auto:2.5", params, [1.0] * 8, "test").bits
    assert sorted(flat) == [2] * 4 + [3] * 4
    for hot in range(8):
        scores = [1.0] * 8
        scores[hot] = 100.0
        bits = allocation_from_sensitivities("auto:2.5", params, scores, "test").bits
        assert bits[hot] == 4 and bits[hot] > max(b for i, b in enumerate(bits) if i != hot)
        assert sum(bits) <= 20
    # the order of the scores decides: the 4 most sensitive layers take the 3 bits (equal sizes, 4x rule)
    scores = [0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.3, 0.6]
    bits = allocation_from_sensitivities("auto:2.5", params, scores, "test").bits
    assert bits == [3, 2, 2, 3, 2, 3, 2, 3]


def test_predicted_losses_rule_and_budget_parsing() -> None:
    assert predicted_losses(1.0) == {2: 1.0, 3: 0.25, 4: 0.0625}
    assert parse_auto_budget("auto:2.25") == Fraction(9, 4)
    for bad in ("auto:1.5", "auto:5", "auto:x", "auto:"):
        with pytest.raises(AllocationError):
            parse_auto_budget(bad)


def _sensitivity_doc(scores, fingerprint="abc", perturbation="gptq@2") -> dict:
    return {"schema": "eacmoe.sensitivity/1", "model": "m", "fingerprint": fingerprint, "score_perturbation": perturbation,
            "layers": [{"layer": i, "moe": s is not None, "score": s} for i, s in enumerate(scores)]}


def test_sensitivity_file_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(_sensitivity_doc([None, 0.3, 0.1, 0.2])))
    assert read_sensitivity_file(path, 4, "abc") == [0.2, 0.3, 0.1, 0.2]  # a dense layer gets the median
    with pytest.raises(AllocationError, match="4 layers, the model 3"):
        read_sensitivity_file(path, 3)
    with pytest.raises(AllocationError, match="other weights"):
        read_sensitivity_file(path, 4, "other")
    path.write_text(json.dumps(_sensitivity_doc([0.1, 0.2], perturbation="normal@0.8")))
    with pytest.raises(AllocationError, match="not 2-bit GPTQ"):
        read_sensitivity_file(path, 2)
    path.write_text("{")
    with pytest.raises(AllocationError, match="JSON"):
        read_sensitivity_file(path, 2)


def test_a_layers_shared_cell_adds_to_its_score_and_wins_it_the_bits(tmp_path: Path) -> None:
    """Per layer, a width governs routed and shared experts alike, so the layer's loss is both cells' KL."""
    from eacmoe.bit_allocation import allocation_from_sensitivities

    doc = _sensitivity_doc([0.1, 0.2, None, 0.15])
    doc["layers"][3]["shared"] = {"score": 0.5, "delta_ppl": 0.0}
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(doc))
    scores = read_sensitivity_file(path, 4)
    assert scores == [0.1, 0.2, 0.2, pytest.approx(0.65)]  # the dense layer: the median of the MoE layers' totals
    # equal layers, budget for one of them at 3 bits: the one whose shared experts are sensitive
    assert allocation_from_sensitivities("auto:2.25", [10] * 4, scores, "test").bits == [2, 2, 2, 3]


def test_the_bundled_sensitivity_files_give_the_documented_schedules() -> None:
    """docs/QUANTIZING.md's auto:2.5 schedules, from the committed sensitivity files and the real layer sizes."""
    from eacmoe.bit_allocation import auto_expert_bits
    from eacmoe.workflow import load_config
    from eacmoe.lazy_loading import build_skeleton

    repo = Path(__file__).resolve().parent.parent
    expected = {"tiny-mixtral": [3, 2, 2, 2, 2, 3, 3, 3], "tiny-qwen-moe": [3, 2, 2, 2, 2, 3, 3, 3]}
    for model, bits in expected.items():
        skeleton = build_skeleton(load_config(model), torch.float32)
        allocation = auto_expert_bits("auto:2.5", skeleton,
                                      sensitivity=repo / "docs" / "eval" / model / "sensitivity" / "sensitivity.json")
        assert allocation.bits == bits and allocation.achieved_average == 2.5


def test_layer_expert_params_counts_routed_shared_and_dense_weights() -> None:
    model, adapter = build("qwen2_moe")
    counts = layer_expert_params(model)
    for layer, count in zip(adapter.decoder_layers(model), counts):
        mlp = layer.mlp
        if adapter.moe_block(layer) is None:
            expected = sum(getattr(mlp, n).weight.numel() for n in ("gate_proj", "up_proj", "down_proj"))
        else:
            expected = (mlp.experts.gate_up_proj.numel() + mlp.experts.down_proj.numel()
                        + sum(p.numel() for p in mlp.shared_expert.parameters()))
        assert count == expected


def test_per_layer_schedule_round_trips_through_the_packed_and_gptq_exports(tmp_path: Path) -> None:
    schedule = [4, 2, 3]
    model, q = quantize("mixtral", bits=schedule)
    ids = calib_ids(2, 16, seed=5)
    with torch.no_grad():
        reference = model(ids).logits
    out = export(model, q, tmp_path / "packed")
    config = json.loads((out / "config.json").read_text())
    experts = {name: spec["bits"] for name, spec in config["quantized_modules"].items() if spec["kind"] == "experts"}
    assert experts == {f"model.layers.{i}.mlp.experts": b for i, b in enumerate(schedule)}
    loaded = load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference, rtol=1e-5, atol=1e-5)
    # GPTQModel's layout: the most common width as `bits`, every other module as a `dynamic` override
    cfg = gptq_quantize_config(config["quantized_modules"], {"act_order": False})
    widths = {}
    for name, spec in config["quantized_modules"].items():
        module = f"{name}.0.gate_proj" if spec["kind"] == "experts" else name
        import re
        overrides = [v["bits"] for k, v in (cfg["dynamic"] or {}).items() if re.match(k.removeprefix("+:"), module)]
        widths[name] = overrides[0] if overrides else cfg["bits"]
    assert widths == {name: spec["bits"] for name, spec in config["quantized_modules"].items()}


def test_auto_bits_without_a_file_uses_the_proxy_end_to_end(tmp_path: Path, capsys, monkeypatch) -> None:
    """`--bits auto:2.5 --no-per-expert-bits` with no sensitivity file: the in-run proxy picks the widths;
    report.json, config.json and the summary carry the per-layer bits and the achieved average (at most 2.5 over the
    expert weights)."""
    from eacmoe import workflow
    from test_cli import FAST, quantize as run_cli, save_tiny, tiny_mixtral_model

    monkeypatch.setattr(workflow, "HELDOUT_SOURCES", ("bundled-test",))
    model_dir = save_tiny(tmp_path / "tiny", tiny_mixtral_model(seed=0))
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "--model", model_dir, *FAST, "--bits", "auto:2.5", "--no-per-expert-bits",
                                "--threads", "1", "--out", out)
    assert code == 0, err[-2000:]
    report = json.loads((out / "report.json").read_text())
    allocation = report["bit_allocation"]
    assert allocation["source"].startswith("proxy:") and sorted(allocation["bits"]) == [2, 3]
    assert allocation["expert_bits"] is None  # one width per layer: every expert of a layer has it
    assert report["routed_expert_bits"] == [[b] * len(row) for b, row in zip(allocation["bits"], report["routed_expert_bits"])]
    assert report["expert_bits"] == allocation["bits"] and allocation["achieved_average"] == 2.5
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["expert_bits"] == allocation["bits"]
    assert [config["quantized_modules"][f"model.layers.{i}.mlp.experts"]["bits"] for i in range(2)] == allocation["bits"]
    assert f"the same schedule for --bits / eacmoe.plan: {','.join(map(str, allocation['bits']))}" in stdout


@pytest.mark.parametrize("per_expert", [False, True])
def test_the_proxies_build_no_autograd_graph(per_expert: bool) -> None:
    """The proxies run every layer over all calibration tokens with weights that require grad (as loaded): under
    autograd the FP stream would carry each layer's graph, i.e. every activation of the pass, into the next."""
    from eacmoe.bit_allocation import proxy_expert_sensitivities, proxy_sensitivities

    model, adapter = build("mixtral")
    assert all(p.requires_grad for p in model.parameters())
    grad_seen = []
    handles = [adapter.moe_block(layer).register_forward_hook(lambda m, a, out: grad_seen.append(torch.is_grad_enabled()))
               for layer in adapter.decoder_layers(model)]
    (proxy_expert_sensitivities if per_expert else proxy_sensitivities)(model, calib_ids(4, 16), group_size=8)
    for h in handles:
        h.remove()
    assert grad_seen and not any(grad_seen)


@torch.no_grad()
def test_proxy_is_the_rtn_block_error_over_the_layer_output_energy() -> None:
    """Layer by layer, against the model's own forward (hooks): the MoE block's input and output, the layer's
    output, and the same block with its experts RTN-quantized at 2 bits on a copy of the model."""
    import copy

    from eacmoe.bit_allocation import proxy_sensitivities
    from eacmoe.quant import QuantSpec, rtn_quantize

    model, adapter = build("mixtral")
    ids = calib_ids(4, 16)
    scores = proxy_sensitivities(model, ids, group_size=8)
    seen = {}
    handles = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        block = adapter.moe_block(layer)
        handles.append(block.register_forward_hook(
            lambda m, args, out, i=i: seen.setdefault(i, {}).update(x=args[0], y=out[0] if isinstance(out, tuple) else out)))
        handles.append(layer.register_forward_hook(
            lambda m, args, out, i=i: seen[i].update(h=out[0] if isinstance(out, tuple) else out)))
    model(ids, use_cache=False)
    for h in handles:
        h.remove()
    spec = QuantSpec(bits=2, group_size=8)
    for i, layer in enumerate(adapter.decoder_layers(model)):
        block = copy.deepcopy(adapter.moe_block(layer))
        experts = block.experts
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(experts, name)
            p.data = torch.stack([rtn_quantize(w, spec).dequantize() for w in p.data])
        y_q = block(seen[i]["x"])
        y_q = y_q[0] if isinstance(y_q, tuple) else y_q
        expected = float((y_q.double() - seen[i]["y"].double()).square().sum() / seen[i]["h"].double().square().sum())
        assert scores[i] == pytest.approx(expected, rel=1e-4)


def test_loaded_models_need_no_grad_anywhere() -> None:
    """Every library path loads through workflow.load_model, which turns autograd off for the weights: a forward
    someone adds outside torch.no_grad() then still builds no graph over the calibration tokens."""
    from eacmoe.workflow import load_model

    model, _ = load_model("tiny-mixtral", torch.float32)
    assert not any(p.requires_grad for p in model.parameters())
    out = model(calib_ids(1, 8)).logits
    assert out.grad_fn is None
