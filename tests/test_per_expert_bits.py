"""`--bits auto:B --per-expert-bits`: the per-module knapsack against brute force and the budget held exactly, a
sensitive expert gets more bits, the sensitivity file's per-expert cells are read by expert index, the schedule text
round-trips, every expert is quantized at its own width (read back from the quantized matrices), and a mixed
2/3/4-bit per-expert schedule round-trips through the packed export (logits of the in-memory quantized model),
GPTQModel's `dynamic` overrides (resolved per module like GPTQModel does) and the planner (bytes of the real packed
tensors)."""
from __future__ import annotations

import importlib.util
import itertools
import json
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from eacmoe.bit_allocation import (
    LayerModules,
    ModuleSensitivity,
    allocate_per_expert,
    file_needs_proxy,
    layer_modules,
    parse_auto_budget,
    predicted_losses,
    read_expert_sensitivities,
)
from eacmoe.export import gptq_quantize_config
from eacmoe.pipeline import QuantizeConfig, progress_mismatch
from eacmoe.schedule import BitsError, format_schedule, parse_bits_schedule
from test_export import export, load
from test_pipeline import calib_ids, quantize
from tiny_models import build

torch.set_num_threads(1)


def flatten(modules, sensitivities):
    """(params, loss tables, (layer, expert|None)) of every knapsack item, as the allocation should see them."""
    params, losses, where = [], [], []
    for i, (m, s) in enumerate(zip(modules, sensitivities)):
        for e, (p, v) in enumerate(zip(m.routed, s.routed)):
            params.append(p)
            losses.append(predicted_losses(v))
            where.append((i, e))
        if m.rest:
            params.append(m.rest)
            losses.append(predicted_losses(s.rest))
            where.append((i, None))
    return params, losses, where


def chosen_bits(allocation, modules):
    """The allocation's width of every item, in `flatten`'s order."""
    bits = []
    for i, m in enumerate(modules):
        bits += allocation.expert_bits[i] if m.routed else []
        bits += [allocation.bits[i]] if m.rest else []
    return bits


@pytest.mark.parametrize("case", range(40))
def test_per_expert_knapsack_is_optimal_and_spends_the_budget_exactly(case: int) -> None:
    rng = random.Random(100 + case)
    modules, sens = [], []
    while sum(len(m.routed) + bool(m.rest) for m in modules) < 5:
        n = rng.randint(0, 3)
        size = rng.choice([4, 6, 8, 12])
        modules.append(LayerModules((size,) * n, rng.choice([0, 4, 8]) if n else rng.choice([4, 8])))
        sens.append(ModuleSensitivity(tuple(rng.uniform(0.01, 1.0) for _ in range(n)), rng.uniform(0.01, 1.0)))
    params, losses, _ = flatten(modules, sens)
    total = sum(params)
    for spec in ("auto:2", "auto:2.25", "auto:2.5", "auto:3", "auto:3.5"):
        budget = parse_auto_budget(spec)
        allocation = allocate_per_expert(spec, modules, sens, "test")
        bits = chosen_bits(allocation, modules)
        used = sum(p * b for p, b in zip(params, bits))
        assert used <= budget * total
        assert allocation.achieved_average == pytest.approx(used / total)
        best = min(sum(t[b] for t, b in zip(losses, choice))
                   for choice in itertools.product((2, 3, 4), repeat=len(params))
                   if sum(p * b for p, b in zip(params, choice)) <= budget * total)
        assert sum(t[b] for t, b in zip(losses, bits)) == pytest.approx(best, rel=1e-12)
        # every loss falls with bits, so an optimum leaves less than any module below 4 bits would cost
        below = [p for p, b in zip(params, bits) if b < 4]
        if below:
            assert budget * total - used < min(below)


def test_equal_experts_at_two_and_a_half_bits_use_the_budget_to_the_last_unit() -> None:
    """8 layers x 8 equal experts at auto:2.5: exactly half of the 64 experts get one bit more (an allocation one
    unit short would leave 31)."""
    modules = [LayerModules((300,) * 8, 0)] * 8
    rng = random.Random(0)
    sens = [ModuleSensitivity(tuple(rng.uniform(0.5, 1.0) for _ in range(8)), 0.0) for _ in range(8)]
    allocation = allocate_per_expert("auto:2.5", modules, sens, "test")
    flat = [b for row in allocation.expert_bits for b in row]
    assert sorted(flat) == [2] * 32 + [3] * 32 and allocation.achieved_average == 2.5
    # the 32 most sensitive experts are the 3-bit ones (4x rule, equal sizes)
    scores = [(s, i, e) for i, layer in enumerate(sens) for e, s in enumerate(layer.routed)]
    top = {(i, e) for _, i, e in sorted(scores, reverse=True)[:32]}
    assert {(i, e) for i, row in enumerate(allocation.expert_bits) for e, b in enumerate(row) if b == 3} == top


def test_an_expert_made_sensitive_gets_more_bits_where_it_is() -> None:
    modules = [LayerModules((100,) * 4, 0)] * 2 + [LayerModules((), 200)]  # 2 MoE layers and a dense one
    flat = [ModuleSensitivity((1.0,) * 4, 0.0)] * 2 + [ModuleSensitivity((), 1.0)]
    for layer, expert in [(0, 0), (0, 3), (1, 1), (1, 2)]:
        sens = [ModuleSensitivity(tuple(100.0 if (i, e) == (layer, expert) else 1.0 for e in range(len(s.routed))),
                                  s.rest) for i, s in enumerate(flat)]
        allocation = allocate_per_expert("auto:2.5", modules, sens, "test")
        table = allocation.expert_bits
        assert table[layer][expert] == 4
        assert all(b < 4 for i, row in enumerate(table[:2]) for e, b in enumerate(row) if (i, e) != (layer, expert))
        assert table[2] is None and allocation.achieved_average <= 2.5
    # the dense layer's MLP is an item too: made sensitive, it takes the bits
    sens = flat[:2] + [ModuleSensitivity((), 1000.0)]
    assert allocate_per_expert("auto:2.5", modules, sens, "test").bits[2] == 4


def _doc(layers) -> dict:
    return {"schema": "eacmoe.sensitivity/1", "model": "m", "fingerprint": "abc", "score_perturbation": "gptq@2",
            "layers": layers}


def test_per_expert_cells_are_read_by_expert_index(tmp_path: Path) -> None:
    modules = [LayerModules((10,) * 3, 0), LayerModules((10,) * 3, 5), LayerModules((), 20)]
    cells = [{"expert": 2, "score": 0.3}, {"expert": 0, "score": 0.1}, {"expert": 1, "score": -0.2}]  # shuffled
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(_doc([
        {"layer": 0, "moe": True, "score": 0.5, "experts": cells},
        {"layer": 1, "moe": True, "score": 0.4, "selection_frequency": [0.5, 0.25, 0.25], "experts": None},
        {"layer": 2, "moe": False, "score": None}])))
    sens, how = read_expert_sensitivities(path, modules, "abc")
    assert sens[0] == ModuleSensitivity((0.1, 0.0, 0.3), 0.5)  # a negative KL counts as 0
    assert sens[1] == ModuleSensitivity((0.2, 0.1, 0.1), 0.4)  # layer score x selection share; shared: the score
    assert sens[2] == ModuleSensitivity((), 0.45)               # dense: the median of the layer scores
    assert "per-expert cells in 1 layers" in how and "selection frequency in 1" in how
    # with the in-run proxy: a layer without cells is split like the proxy, shared experts set against the routed
    proxy = [ModuleSensitivity((9.0, 9.0, 9.0), 0.0), ModuleSensitivity((1.0, 3.0, 4.0), 2.0), ModuleSensitivity((), 7.0)]
    sens, how = read_expert_sensitivities(path, modules, "abc", proxy)
    assert sens[0] == ModuleSensitivity((0.1, 0.0, 0.3), 0.5)  # measured cells win
    assert sens[1].routed == pytest.approx((0.05, 0.15, 0.2)) and sens[1].rest == pytest.approx(0.1)
    assert sens[2] == ModuleSensitivity((), 0.45)
    assert "split by the in-run per-module proxy in 1" in how
    assert file_needs_proxy(path, modules)
    assert not file_needs_proxy(path, [modules[0], LayerModules((), 5), modules[2]])
    path.write_text(json.dumps(_doc([{"layer": 0, "moe": True, "score": 0.5, "experts": cells[:2]},
                                     {"layer": 1, "score": 0.4}, {"layer": 2, "score": None}])))
    with pytest.raises(ValueError, match="layer 0 has per-expert cells for 2 experts, the model 3"):
        read_expert_sensitivities(path, modules)


def test_a_shared_cell_is_the_shared_experts_sensitivity(tmp_path: Path) -> None:
    modules = [LayerModules((10,) * 3, 5), LayerModules((10,) * 3, 5)]
    cells = [{"expert": e, "score": 0.1} for e in range(3)]
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(_doc([
        {"layer": 0, "moe": True, "score": 0.3, "experts": cells, "shared": {"score": 0.9, "delta_ppl": 0.1}},
        {"layer": 1, "moe": True, "score": 0.3, "experts": cells}])))
    proxy = [ModuleSensitivity((1.0, 1.0, 1.0), 6.0)] * 2
    sens, how = read_expert_sensitivities(path, modules, "abc", proxy)
    assert sens[0] == ModuleSensitivity((0.1, 0.1, 0.1), 0.9)           # measured: the cell, not the proxy
    assert sens[1].rest == pytest.approx(0.6)                            # unmeasured: score x 6 / 3
    assert "shared-expert cells in 1" in how and "their proxy" in how
    assert file_needs_proxy(path, modules)                               # layer 1 still needs it
    path.write_text(json.dumps(_doc([{"layer": 0, "moe": True, "score": 0.3, "experts": cells,
                                      "shared": {"score": 0.9, "delta_ppl": 0.1}}])))
    assert not file_needs_proxy(path, modules[:1])
    sens, how = read_expert_sensitivities(path, modules[:1], "abc")
    assert allocate_per_expert("auto:2.5", modules[:1], sens, how).bits == [4]  # 4 bits where the loss is


def test_the_committed_tiny_mixtral_file_gives_a_per_expert_schedule_at_exactly_two_and_a_half() -> None:
    from eacmoe.lazy_loading import build_skeleton
    from eacmoe.workflow import load_config

    repo = Path(__file__).resolve().parent.parent
    skeleton = build_skeleton(load_config("tiny-mixtral"), torch.float32)
    modules = layer_modules(skeleton)
    sens, _ = read_expert_sensitivities(repo / "docs/eval/tiny-mixtral/sensitivity/sensitivity.json", modules)
    allocation = allocate_per_expert("auto:2.5", modules, sens, "file")
    flat = [b for row in allocation.expert_bits for b in row]
    assert allocation.achieved_average == 2.5 and sorted(flat) == [2] * 32 + [3] * 32
    # the most sensitive measured cell is 3-bit, the least sensitive 2-bit
    cells = [(s, i, e) for i, layer in enumerate(sens) for e, s in enumerate(layer.routed)]
    (_, i_hi, e_hi), (_, i_lo, e_lo) = max(cells), min(cells)
    assert allocation.expert_bits[i_hi][e_hi] == 3 and allocation.expert_bits[i_lo][e_lo] == 2


def test_schedule_text_round_trips_and_bad_text_is_refused() -> None:
    layer_bits, routed = [3, 2, 4], [[2, 3, 4, 2], None, [4, 4, 2, 2]]
    text = format_schedule(layer_bits, routed)
    assert text == "3:2/3/4/2,2,4:4/4/2/2"
    assert parse_bits_schedule(text, 3) == (layer_bits, routed)
    assert parse_bits_schedule("2/3/3,2", 2) == ([3, 2], [[2, 3, 3], None])  # no ':': the most common width
    assert parse_bits_schedule("3,2,2", 3) == ([3, 2, 2], None)
    for bad, needle in (("2/5/2,2", "bits must be one of"), ("2/x,2", "per-module bits list"),
                        ("2/3", "1 entries but the model has 2 layers")):
        with pytest.raises(BitsError, match=needle):
            parse_bits_schedule(bad, 2)


# the tiny Mixtral: 3 layers of 8 experts, 2, 3 and 4 bits in every layer, no two layers alike
MIXED = [[2, 3, 4, 2, 2, 3, 4, 4], [4, 2, 2, 3, 3, 2, 4, 2], [3, 3, 2, 4, 2, 4, 3, 2]]


def test_each_expert_is_quantized_at_its_own_width_and_resume_sees_the_schedule() -> None:
    from eacmoe.workflow import bits_account

    model, q = quantize("mixtral", bits=[2, 2, 2], routed_expert_bits=MIXED, attn_bits=4)
    for i, row in enumerate(MIXED):
        for e, b in enumerate(row):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert q.quantized[f"layers.{i}.mlp.experts.{e}.{proj}"].bits == b
        assert q.quantized[f"layers.{i}.self_attn.q_proj"].bits == 4
    account = bits_account(q)
    assert account.routed_expert_table(3) == MIXED
    routed_params = sum(w.numel() for w in q.adapter.expert_weights(q.adapter.moe_block(q.layers[0]), 0).values())
    assert account.expert_average_bits == pytest.approx(sum(map(sum, MIXED)) * routed_params
                                                        / (24 * routed_params))
    ids = calib_ids()
    base = QuantizeConfig(expert_bits=[2, 2, 2], routed_expert_bits=MIXED).fingerprint(ids, "m")
    swapped = QuantizeConfig(expert_bits=[2, 2, 2], routed_expert_bits=[MIXED[0][::-1], *MIXED[1:]]).fingerprint(ids, "m")
    assert "routed_expert_bits" in progress_mismatch(base, swapped)
    assert QuantizeConfig(expert_bits=[3, 2], routed_expert_bits=None).expert_bits_for(1, 5) == 2


def _dynamic_width(cfg: dict, module: str) -> int:
    """The width GPTQModel gives `module`: the first matching `+:` override, else the default bits."""
    for pattern, override in (cfg["dynamic"] or {}).items():
        if re.match(pattern.removeprefix("+:"), module):
            return override["bits"]
    return cfg["bits"]


def test_per_expert_schedule_round_trips_through_the_packed_export_and_the_gptq_overrides(tmp_path: Path) -> None:
    model, q = quantize("mixtral", bits=[2, 2, 2], routed_expert_bits=MIXED)
    ids = calib_ids(2, 16, seed=5)
    with torch.no_grad():
        reference = model(ids).logits
    out = export(model, q, tmp_path / "packed")
    config = json.loads((out / "config.json").read_text())
    experts = {n: s["bits"] for n, s in config["quantized_modules"].items() if s["kind"] == "experts"}
    assert experts == {f"model.layers.{i}.mlp.experts": row for i, row in enumerate(MIXED)}
    loaded = load(out)
    for i, row in enumerate(MIXED):
        packed = loaded.model.layers[i].mlp.experts
        assert [packed.expert(e).down_proj.bits for e in range(8)] == row
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference, rtol=1e-5, atol=1e-5)
    # GPTQModel's quantize_config: every projection of every expert resolves to its own width
    cfg = gptq_quantize_config(config["quantized_modules"], {"act_order": False})
    for name, spec in config["quantized_modules"].items():
        if spec["kind"] == "experts":
            for e, b in enumerate(spec["bits"]):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    assert _dynamic_width(cfg, f"{name}.{e}.{proj}") == b, (name, e, proj)
        else:
            assert _dynamic_width(cfg, name) == spec["bits"], name


def test_the_planner_sizes_a_per_expert_schedule_as_the_packed_tensors(tmp_path: Path) -> None:
    """eacmoe.plan with the per-module --bits text: the routed experts' bytes equal the packed export's expert
    tensors (qweight, qzeros, scales, g_idx), and the average code bits the allocation's."""
    from safetensors.torch import load_file

    from eacmoe.plan import parse_bits_plan, plan_memory

    model, q = quantize("mixtral", bits=[2, 2, 2], routed_expert_bits=MIXED)
    out = export(model, q, tmp_path / "packed")
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if ".mlp.experts." in k)
    text = format_schedule([2, 2, 2], MIXED)
    plan = plan_memory(model.config, parse_bits_plan(text, 4, 8, 3))
    assert plan.components["routed_experts"].total == stored
    assert plan.components["routed_experts"].code_bits == sum(
        q.quantized[n].codes.numel() * q.quantized[n].bits for n in q.quantized if ".experts." in n)
    with pytest.raises(Exception, match="8 routed experts but its entry gives 3 widths"):
        plan_memory(model.config, parse_bits_plan("2/2/2,2,2", 4, 8, 3))


def test_per_expert_bits_end_to_end_with_the_proxy(tmp_path: Path, capsys, monkeypatch) -> None:
    """`--bits auto:2.5` (per expert by default; no file: the per-module proxy): report.json carries the per-expert widths
    as quantized, equal to the allocation's, and the achieved average over the expert weights; config.json's packed
    experts carry them; the printed schedule is accepted by --bits and gives the same widths."""
    from eacmoe import workflow
    from test_cli import FAST, quantize as run_cli, save_tiny, tiny_mixtral_model

    monkeypatch.setattr(workflow, "HELDOUT_SOURCES", ("bundled-test",))
    model_dir = save_tiny(tmp_path / "tiny", tiny_mixtral_model(seed=0))
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "--model", model_dir, *FAST, "--bits", "auto:2.5", "--threads", "1",
                                "--out", out)
    assert code == 0, err[-2000:]
    report = json.loads((out / "report.json").read_text())
    allocation = report["bit_allocation"]
    assert allocation["source"].startswith("proxy: per module")
    assert report["routed_expert_bits"] == allocation["expert_bits"]
    assert report["average_expert_bits"] == pytest.approx(allocation["achieved_average"])
    assert report["average_expert_bits"] <= 2.5
    config = json.loads((out / "config.json").read_text())
    for i, row in enumerate(allocation["expert_bits"]):
        spec_bits = config["quantized_modules"][f"model.layers.{i}.mlp.experts"]["bits"]
        assert (spec_bits if isinstance(spec_bits, list) else [spec_bits] * len(row)) == row
    assert f"the same schedule for --bits / eacmoe.plan: {allocation['schedule']}" in stdout
    assert (out / "bits_schedule.txt").read_text() == allocation["schedule"] + "\n"
    again = tmp_path / "again"
    code, _, err = run_cli(capsys, "--model", model_dir, *FAST, "--bits", allocation["schedule"], "--threads", "1",
                           "--out", again)
    assert code == 0, err[-2000:]
    assert json.loads((again / "report.json").read_text())["routed_expert_bits"] == allocation["expert_bits"]


def test_per_expert_bits_needs_auto_bits(tmp_path: Path, capsys) -> None:
    from test_cli import quantize as run_cli

    code, _, err = run_cli(capsys, "--bits", "2", "--per-expert-bits", "--out", tmp_path / "x")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --per-expert-bits is only used with")
    code, _, err = run_cli(capsys, "--bits", "2.5", "--no-per-expert-bits", "--out", tmp_path / "x")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --no-per-expert-bits is only used with")
    code, _, err = run_cli(capsys, "--bits", "2/2/2,2,2,2,2,2,2,2", "--out", tmp_path / "y")
    assert code == 2 and "layer 0 has 8 routed experts but its entry gives 3 widths" in err


def test_the_proxy_per_expert_is_the_weighted_output_change_of_that_expert_alone() -> None:
    """Each expert's proxy against the block run twice by the model's own forward: with every weight FP and with
    only that expert RTN-quantized, routing unchanged (the experts' outputs add up, so the block-output change is
    that expert's combine-weighted change); normalised by the layer output energy."""
    import copy

    from eacmoe.bit_allocation import proxy_expert_sensitivities
    from eacmoe.quant import QuantSpec, rtn_quantize

    model, adapter = build("mixtral")
    ids = calib_ids(4, 16)
    scores = proxy_expert_sensitivities(model, ids, group_size=8)
    seen = {}
    handles = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        block = adapter.moe_block(layer)
        handles.append(block.register_forward_hook(
            lambda m, args, out, i=i: seen.setdefault(i, {}).update(x=args[0], y=out[0] if isinstance(out, tuple) else out)))
        handles.append(layer.register_forward_hook(
            lambda m, args, out, i=i: seen[i].update(h=out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    spec = QuantSpec(bits=2, group_size=8)
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for e in range(adapter.num_experts(adapter.moe_block(layer))):
            block = copy.deepcopy(adapter.moe_block(layer))
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(block.experts, name)
                p.data[e] = rtn_quantize(p.data[e], spec).dequantize()
            with torch.no_grad():
                y_q = block(seen[i]["x"])
            y_q = y_q[0] if isinstance(y_q, tuple) else y_q
            expected = float((y_q.double() - seen[i]["y"].double()).square().sum()
                             / seen[i]["h"].double().square().sum())
            assert scores[i].routed[e] == pytest.approx(expected, rel=1e-4, abs=1e-12), (i, e)


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="gptqmodel is not installed")
@pytest.mark.parametrize("name,layer_bits", [("mixtral", [2, 2, 2]), ("qwen2_moe", [4, 2, 4])])
def test_gptqmodel_loads_a_per_expert_schedule_with_the_logits_of_our_runtime(tmp_path: Path, name: str,
                                                                              layer_bits: list[int]) -> None:
    """A mixed 2/3/4-bit per-expert schedule (Qwen2-MoE: its shared experts at the layer widths, 48 wide so never
    3-bit) exported with --format gptq: GPTQModel builds every quantized module from the `dynamic` overrides and
    its logits equal our packed runtime's (fp16 kernel noise only, tests/test_gptq_export_gptqmodel.py)."""
    from transformers import AutoTokenizer

    from eacmoe.assets import TOKENIZER_DIR
    from test_gptq_export_gptqmodel import RELATIVE_TOLERANCE, all_moe, gptqmodel_logits

    kw = dict(bits=layer_bits, group_size=16, routed_expert_bits=MIXED)
    model, q = quantize(name, model=all_moe(name), **kw)
    ids = calib_ids(2, 16, seed=7)
    packed = load(export(model, q, tmp_path / "packed"))
    model2, q2 = quantize(name, model=all_moe(name), **kw)
    gptq_dir = export(model2, q2, tmp_path / "gptq", fmt="gptq", tokenizer=AutoTokenizer.from_pretrained(TOKENIZER_DIR))
    quantize_config = json.loads((gptq_dir / "quantize_config.json").read_text())
    assert any(re.search(r"experts\\\.\d+\\\.", k) for k in quantize_config["dynamic"])  # per-expert overrides
    theirs = gptqmodel_logits(gptq_dir, ids, tmp_path)
    assert theirs["quantized_modules"] == len(q2.quantized), "GPTQModel did not build every quantized module"
    assert theirs["made_up"] == [], "GPTQModel initialised tensors the checkpoint does not hold"
    with torch.no_grad():
        ours = packed(ids).logits
    error = (theirs["logits"] - ours).abs().max() / ours.std()
    assert error < RELATIVE_TOLERANCE, f"GPTQModel vs eacmoe runtime: max |diff| / std = {error:.2e}"


def test_a_long_schedule_is_summarised_per_layer_and_read_back_from_its_file() -> None:
    """A per-module schedule too long for one line (a real model's 128 experts per layer) is shown as each layer's
    mean routed width (shared width kept); the command to reuse it reads bits_schedule.txt in the output directory."""
    from eacmoe.report import SCHEDULE_INLINE_CHARS, _allocation_line

    layers = ["4:" + "/".join(["3"] * 32 + ["2"] * 32), "/".join(["2"] * 63 + ["4"])]
    schedule = ",".join(layers)
    assert len(schedule) > SCHEDULE_INLINE_CHARS
    allocation = {"spec": "auto:2.5", "bits": [4, 2], "expert_bits": [[3] * 32 + [2] * 32, [2] * 63 + [4]],
                  "schedule": schedule, "achieved_average": 2.5, "source": "proxy"}
    line = _allocation_line(allocation, "out/m")
    assert "expert bits per module 4:2.50,2.03 (per layer" in line   # (32 x 3 + 32 x 2) / 64, (63 x 2 + 4) / 64
    assert line.endswith('the same schedule for --bits / eacmoe.plan: "$(cat out/m/bits_schedule.txt)"')
    assert schedule not in line
    short = {**allocation, "schedule": "3/2,2", "expert_bits": [[3, 2], None]}
    assert _allocation_line(short, "out/m").endswith("the same schedule for --bits / eacmoe.plan: 3/2,2")
    spaced = _allocation_line(allocation, "my runs/m")  # a shell word of its own inside the quotes
    assert spaced.endswith('"$(cat ' + "'my runs/m/bits_schedule.txt'" + ')"')
    per_layer = {**allocation, "bits": [3] * 40 + [2] * 40, "schedule": ",".join(["3"] * 40 + ["2"] * 40),
                 "expert_bits": None}
    line = _allocation_line(per_layer, "out/m")
    assert "expert bits per layer 3,3," in line and "mean width" not in line


def test_the_default_falls_back_to_per_layer_where_the_file_cannot_be_split(tmp_path: Path) -> None:
    """`auto:B` by default (per_expert=None): per routed expert from a file with per-expert cells; from a file
    without them, where the proxy cannot run (no calibration tokens: a lazily loaded model, RTN), per layer from the
    file's layer scores, not the selection-frequency split that an explicit --per-expert-bits (True) gets."""
    from eacmoe.bit_allocation import auto_expert_bits
    from eacmoe.lazy_loading import build_skeleton
    from eacmoe.workflow import load_config

    committed = Path(__file__).resolve().parent.parent / "docs/eval/tiny-mixtral/sensitivity/sensitivity.json"
    doc = json.loads(committed.read_text())
    for layer in doc["layers"]:
        layer.pop("experts", None)
    without_cells = tmp_path / "sensitivity.json"
    without_cells.write_text(json.dumps(doc))
    skeleton = build_skeleton(load_config("tiny-mixtral"), torch.float32)

    with_cells = auto_expert_bits("auto:2.5", skeleton, sensitivity=committed, per_expert=None)
    assert with_cells.expert_bits == auto_expert_bits("auto:2.5", skeleton, sensitivity=committed,
                                                      per_expert=True).expert_bits
    assert with_cells.expert_bits is not None
    fallback = auto_expert_bits("auto:2.5", skeleton, sensitivity=without_cells, per_expert=None)
    per_layer = auto_expert_bits("auto:2.5", skeleton, sensitivity=without_cells, per_expert=False)
    assert fallback.expert_bits is None and fallback.bits == per_layer.bits == [3, 2, 2, 2, 2, 3, 3, 3]
    split = auto_expert_bits("auto:2.5", skeleton, sensitivity=without_cells, per_expert=True)
    assert split.expert_bits is not None and "frequency" in split.source


def test_auto_bits_with_a_file_by_default_is_per_expert(tmp_path: Path, capsys, monkeypatch) -> None:
    """`--bits auto:2.5 --sensitivity FILE` without --per-expert-bits on the bundled tiny-mixtral: the widths are the
    file's per-expert allocation (checked before loading the model), and the default output directory says so."""
    from eacmoe import workflow
    from eacmoe.bit_allocation import auto_expert_bits
    from eacmoe.job_checks import default_out
    from eacmoe.lazy_loading import build_skeleton
    from test_cli import FAST, quantize as run_cli

    monkeypatch.setattr(workflow, "HELDOUT_SOURCES", ("bundled-test",))
    committed = Path(__file__).resolve().parent.parent / "docs/eval/tiny-mixtral/sensitivity/sensitivity.json"
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--model", "tiny-mixtral", *FAST, "--bits", "auto:2.5", "--sensitivity", committed,
                           "--threads", "1", "--out", out)
    assert code == 0, err[-2000:]
    allocation = json.loads((out / "report.json").read_text())["bit_allocation"]
    expected = auto_expert_bits("auto:2.5", build_skeleton(workflow.load_config("tiny-mixtral"), torch.float32),
                                sensitivity=committed, per_expert=True)
    assert allocation["expert_bits"] == expected.expert_bits and allocation["source"] == expected.source
    job = workflow.QuantizeJob(model="tiny-mixtral", bits="auto:2.5")
    assert default_out(job).name.endswith("-wauto2.5e")
    assert default_out(workflow.QuantizeJob(model="tiny-mixtral", bits="auto:2.5", per_expert_bits=False)).name.endswith(
        "-wauto2.5")
