"""The sensitivity study (eacmoe.sensitivity, `python -m eacmoe.eval --sensitivity`) on a tiny random Mixtral saved
with the bundled tokenizer: selection frequencies against the model's own routing, a perturbation touches exactly
its target, the noise has the stated std, SZ3 at matched error, zero noise costs nothing, and the sensitivity
file."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from eacmoe import eval as eval_cli
from eacmoe.adapters import get_adapter
from eacmoe.codecs import ErrorBound, compress_matrix, mean_abs
from eacmoe.evaluation import SweepError, SweepSettings
from eacmoe.sensitivity import (
    SENSITIVITY_FILE,
    Perturbation,
    StudySettings,
    Target,
    matched_sz3_bound,
    perturbed,
    plan_targets,
    run_study,
    selection_frequencies,
)
from eacmoe.workflow import load_model

SETTINGS = SweepSettings(eval_samples=2, eval_seqlen=32, nsamples=4, seqlen=32, group_size=32, threads=1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import mixtral_with_bundled_tokenizer

    model, tokenizer = mixtral_with_bundled_tokenizer()
    with torch.no_grad():  # routing that varies across tokens, so the frequencies are not uniform
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(std=0.3)
    out = tmp_path_factory.mktemp("tiny-mixtral")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(str(tiny_dir), torch.float32)[0]


def test_selection_frequencies_equal_the_routers_own_choices(model):
    ids = torch.randint(0, model.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(1))
    expected = []
    hooks = []
    for layer in model.model.layers:
        counts = torch.zeros(model.config.num_local_experts, dtype=torch.long)
        expected.append(counts)

        def count(_module, args, kwargs, counts=counts):
            top_k_index = kwargs["top_k_index"] if "top_k_index" in kwargs else args[1]
            counts += torch.bincount(top_k_index.flatten(), minlength=counts.numel())
        hooks.append(layer.mlp.experts.register_forward_pre_hook(count, with_kwargs=True))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    got = selection_frequencies(model, ids, batch_size=2)
    assert got == [c.tolist() for c in expected]
    assert all(sum(c) == 3 * 32 * model.config.num_experts_per_tok for c in got)
    assert len({max(c) for c in got}) > 1 or any(len(set(c)) > 1 for c in got)  # not uniform: top1 is meaningful


def test_top1_target_perturbs_exactly_one_expert_and_is_restored(model):
    counts = [[5, 9, 9, 1, 0, 2, 3, 4]] * 3  # expert 1 and 2 tie: the lower index wins
    targets = {t.name: t for t in plan_targets(counts, top_k=2)}
    assert targets["L1:top1"].experts == ((1, (1,)),)
    assert targets["L1:top2"].experts == ((1, (1, 2)),)
    assert [t.layers for n, t in targets.items() if n.startswith("third")] == [(0,), (1,), (2,)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with perturbed(model, targets["L1:top1"], Perturbation("normal", 0.3),
                   generator=torch.Generator().manual_seed(0)):
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"}
        for key in changed:
            differs = (before[key] != after[key]).flatten(1).any(1)
            assert differs.tolist() == [e == 1 for e in range(8)]
            assert (before[key][1] != after[key][1]).float().mean() > 0.99  # every weight of that expert
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _expert_matrices(model, layer: int, experts) -> list[torch.Tensor]:
    adapter = get_adapter(model)
    block = adapter.moe_block(adapter.decoder_layers(model)[layer])
    return [w.detach().clone() for e in experts for w in adapter.expert_weights(block, e).values()]


@pytest.mark.parametrize("kind", ["normal", "sz3"])
def test_applied_error_has_the_stated_std(model, kind):
    """normal@p adds N(0, (p mean|w|)^2) per matrix; sz3@p at the matched bound has (within 10%) the same std."""
    p = 0.5
    target = Target("L2:all", "all", ((2, tuple(range(8))),))
    before = _expert_matrices(model, 2, range(8))
    with perturbed(model, target, Perturbation(kind, p), generator=torch.Generator().manual_seed(0)) as applied:
        after = _expert_matrices(model, 2, range(8))
    tolerance = 0.03 if kind == "normal" else 0.10  # normal: sampling error of ~6000 draws; sz3: the brief's 10%
    for w, w_new in zip(before, after):
        error = (w_new - w).double()
        stated = p * mean_abs(w.numpy())
        assert error.std().item() == pytest.approx(stated, rel=tolerance)
        assert abs(error.mean().item()) < 0.05 * stated
    assert applied["error_std_over_mean_abs"] == pytest.approx(p, rel=tolerance)
    if kind == "sz3":
        assert applied["max_error_over_bound"] <= 1.0


def test_matched_sz3_bound_on_trained_weights():
    """On the bundled model's trained experts, SZ3 at bound sqrt(3) p mean|w| has error std within 10% of p mean|w|."""
    trained, _ = load_model("tiny-mixtral", torch.float32)
    adapter = get_adapter(trained)
    layers = adapter.decoder_layers(trained)
    for layer, e in ((0, 0), (len(layers) // 2, 3), (len(layers) - 1, 7)):
        for w in (v.detach() for v in adapter.expert_weights(adapter.moe_block(layers[layer]), e).values()):
            for p in (0.1, 0.8):
                bound = matched_sz3_bound(w, p)
                assert bound == pytest.approx(math.sqrt(3) * p * mean_abs(w.numpy()))
                restored, stats = compress_matrix(w, "sz3", ErrorBound("abs", bound))
                assert stats.max_abs_error <= bound
                assert (restored - w).double().std().item() == pytest.approx(p * mean_abs(w.numpy()), rel=0.10)


@pytest.fixture(scope="module")
def study(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "sensitivity"
    settings = StudySettings(sweep=SETTINGS, noise_levels=(0.0, 0.5), per_expert=False)
    rows = run_study(str(tiny_dir), settings, out, command="test")
    return out, settings, rows


def test_zero_noise_costs_nothing_and_noise_does(study):
    _, _, rows = study
    by_cell = {r["cell"]: r["bundled-test"] for r in rows}
    fp_ppl = by_cell["fp"]["ppl"]
    zero = [c for c in by_cell if c.endswith("@0")]
    assert len(zero) == 2 * (3 * 3 + 3)  # normal and sz3, top1 / top2 / all of 3 layers and the 3 thirds
    for cell in zero:
        assert by_cell[cell]["kl"] == 0.0 and by_cell[cell]["ppl"] == fp_ppl, cell
    noisy = [c for c in by_cell if c.endswith("@0.5") or "gptq" in c]
    assert noisy and all(by_cell[c]["kl"] > 0 for c in noisy)
    seeds = [r["noise_seed"] for r in rows if r["cell"] != "fp"]
    assert len(set(seeds)) == len(seeds)  # each cell its own recorded seed


def test_sensitivity_file_round_trips_with_one_score_per_layer(study, tiny_dir):
    out, settings, rows = study
    doc = json.loads((out / SENSITIVITY_FILE).read_text())
    assert doc["schema"] == "eacmoe.sensitivity/1" and doc["score_perturbation"] == "gptq@2"
    assert [layer["layer"] for layer in doc["layers"]] == [0, 1, 2]
    kl = {r["cell"]: r["bundled-test"]["kl"] for r in rows}
    for layer in doc["layers"]:
        assert layer["score"] == kl[f"L{layer['layer']}:all|gptq@2"]
        assert sum(layer["selection_frequency"]) == pytest.approx(1.0)
    assert set(doc["thirds"]) == {"first", "middle", "last"}
    assert (out / "heatmap.png").stat().st_size > 0 and "third" in (out / "REPORT.md").read_text()


def test_second_run_resumes_without_measuring(study, tiny_dir, monkeypatch):
    from eacmoe import sensitivity

    out, settings, rows = study

    def refuse(*_args, **_kwargs):
        raise AssertionError("a finished cell was measured again")
    monkeypatch.setattr(sensitivity, "evaluate_model", refuse)
    assert [r["cell"] for r in run_study(str(tiny_dir), settings, out)] == [r["cell"] for r in rows]


def test_shared_target_copies_exactly_the_shared_experts_of_the_gptq_model_and_is_restored():
    from tiny_models import build

    model, adapter = build("qwen2_moe")  # shared experts in layers 0 and 2; layer 1 dense
    targets = [t for t in plan_targets([[3] * 8, None, [3] * 8], top_k=2, shared_layers=[0, 2])
               if t.group == "shared"]
    assert [(t.name, t.experts, t.shared) for t in targets] == [("L0:shared", (), (0,)), ("L2:shared", (), (2,))]
    source = copy.deepcopy(model)  # stands in for the GPTQ model: every weight differs from the FP one
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source_state = source.state_dict()
    with perturbed(model, targets[1], Perturbation("gptq", 2), gptq_model=source) as applied:
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {f"model.layers.2.mlp.shared_expert.{p}.weight"
                           for p in ("gate_proj", "up_proj", "down_proj")}
        assert all(torch.equal(after[k], source_state[k]) for k in changed)
        assert applied["error_std"] == pytest.approx(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_study_of_a_model_with_shared_experts_scores_them_in_the_file(tmp_path):
    from tiny_models import family_with_bundled_tokenizer

    model, tokenizer = family_with_bundled_tokenizer("qwen2_moe")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    settings = StudySettings(sweep=dataclasses.replace(SETTINGS, group_size=16), noise_levels=(0.5,),
                             per_expert=False)
    rows = run_study(str(tmp_path / "m"), settings, tmp_path / "out", command="test")
    kl = {r["cell"]: r["bundled-test"]["kl"] for r in rows}
    assert sorted(c for c in kl if ":shared" in c) == ["L0:shared|gptq@2", "L2:shared|gptq@2"]
    doc = json.loads((tmp_path / "out" / SENSITIVITY_FILE).read_text())
    assert doc["layers"][0]["shared"]["score"] == kl["L0:shared|gptq@2"] > 0
    assert doc["layers"][2]["shared"]["score"] == kl["L2:shared|gptq@2"] > 0
    assert doc["layers"][1]["shared"] is None and doc["layers"][0]["score"] == kl["L0:all|gptq@2"]
    assert "| L0:shared |" in (tmp_path / "out" / "REPORT.md").read_text()


def test_a_study_without_per_expert_cells_is_continued_with_them(study, tiny_dir, tmp_path):
    out, settings, rows = study
    shutil.copytree(out, tmp_path / "s")
    more = run_study(str(tiny_dir), dataclasses.replace(settings, per_expert=True), tmp_path / "s")
    added = [r["cell"] for r in more[len(rows):]]
    assert [r["cell"] for r in more[:len(rows)]] == [r["cell"] for r in rows]  # nothing measured twice
    assert sorted(added) == sorted(f"L{i}:E{e}|gptq@2" for i in range(3) for e in range(8))
    doc = json.loads((tmp_path / "s" / SENSITIVITY_FILE).read_text())
    assert [len(layer["experts"]) for layer in doc["layers"]] == [8, 8, 8]
    with pytest.raises(SweepError, match="other settings \\(group_size\\)"):
        run_study(str(tiny_dir), dataclasses.replace(settings, sweep=dataclasses.replace(SETTINGS, group_size=16)),
                  tmp_path / "s")


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--sensitivity", "--noise-levels", "-1", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert eval_cli.main(["--model", "tiny-mixtral", "--sensitivity", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and str(blocker) in err
    assert not blocker.is_dir() and blocker.read_text() == "x"


def _canned_row(cell, target, group, experts, perturbation, ppl, kl, cloze, nextsent, settings):
    return {"cell": cell, "model": "m", "fingerprint": "f", "settings": settings, "target": target, "group": group,
            "experts": experts, "perturbation": perturbation,
            "bundled-test": {"ppl": ppl, "kl": kl, "shift": {"any": 0.0, "half": 0.0, "all": 0.0}},
            "suite": {"cloze_acc": cloze, "cloze_acc_stderr": 0.03, "nextsent_acc": nextsent,
                      "nextsent_acc_stderr": 0.04, "nextsent_acc_norm": 0.99}}  # acc_norm: not in the mean


def test_suite_accuracy_changes_reach_the_heatmap_the_report_and_the_file(tmp_path):
    from eacmoe.sensitivity import heatmap_panels, write_outputs

    settings = {**StudySettings(sweep=SweepSettings(suite_tasks=("eacmoe_cloze", "eacmoe_nextsent"),
                                                     suite_limit=50, eval_seqlen=32, seqlen=32)).as_dict()}
    rows = [_canned_row("fp", None, "fp", None, None, 40.0, 0.0, 0.20, 0.40, settings)]
    rows[0]["experts"] = None
    # two layers x (all, top1) at one noise level, and the thirds: acc change = mean of the two tasks minus FP's
    accs = {}
    for layer in (0, 1):
        for group, experts, drop in (("all", [0, 1], 0.06), ("top1", [1], 0.02)):
            target = f"L{layer}:{group}"
            cloze, nextsent = 0.20 - drop * (1 + layer), 0.40 - drop / 2
            accs[target] = 100 * ((cloze + nextsent) / 2 - 0.30)
            rows.append(_canned_row(f"{target}|normal@0.3", target, group, {str(layer): experts}, "normal@0.3",
                                    41.0 + layer, 0.01 * (1 + layer), cloze, nextsent, settings))
    for third, layer in (("first", 0), ("middle", 1), ("last", 1)):
        rows.append(_canned_row(f"third:{third}|normal@0.3", f"third:{third}", "third", {str(layer): [0, 1]},
                                "normal@0.3", 42.0, 0.02, 0.19, 0.41, settings))
    layer_panel, third_panel = heatmap_panels(rows, "delta_acc")
    assert layer_panel[2] == ["top1 normal@0.3", "all normal@0.3"] and layer_panel[3] == ["L0", "L1"]
    expected = [[accs[f"L{layer}:{g}"] for g in ("top1", "all")] for layer in (0, 1)]
    np.testing.assert_allclose(layer_panel[1], expected, atol=1e-9)
    np.testing.assert_allclose(third_panel[1], [[0.0]] * 3, atol=1e-9)  # (0.19 + 0.41) / 2 = FP's 0.30
    np.testing.assert_allclose(heatmap_panels(rows, "delta_ppl")[0][1], [[1.0, 1.0], [2.0, 2.0]])

    doc = write_outputs(rows, [[5, 5], [5, 5]], tmp_path)
    assert doc["layers"][1]["delta_acc"] == {"normal@0.3": pytest.approx(accs["L1:all"])}
    report = (tmp_path / "REPORT.md").read_text()
    assert "## Suite accuracy change against FP (points)" in report
    assert f"| L1:all | {accs['L1:all']:+.2f} |" in report
    assert "FP 30.00%" in report and "about 2.50 points" in report  # sqrt(3^2 + 4^2) / 2
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
