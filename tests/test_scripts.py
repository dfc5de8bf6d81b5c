"""Smoke tests of the measurement scripts on the bundled tiny-mixtral with small settings: they run end to end,
write what they promise, and their numbers obey the properties that must hold whatever the machine."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_script(name: str, folder: str = "scripts"):
    spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def packed_checkpoint(tmp_path_factory) -> Path:
    """A packed export of the bundled tiny-mixtral (GPTQ 2-bit experts, 4-bit attention, a tiny calibration)."""
    from eacmoe.workflow import QuantizeJob, run_job

    out = tmp_path_factory.mktemp("ckpt") / "tiny-mixtral-w2"
    run_job(QuantizeJob(out=str(out), method="gptq", nsamples=4, seqlen=64, eval_samples=2, eval_seqlen=32))
    return out


def test_pesf_sweep_writes_report_and_skips_more_with_larger_alpha(tmp_path):
    sweep = _load_script("pesf_sweep")
    sweep.main(["--alphas", "0.3", "1.0", "--eval-samples", "4", "--seqlen", "64", "--batch-size", "4",
                "--speed-batch", "1", "--speed-rounds", "1", "--suite-limit", "0", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["alpha"], r["weights"]) for r in rows] == [(0.0, "-"), (0.3, "drop"), (0.3, "renormalise"),
                                                         (1.0, "drop"), (1.0, "renormalise")]
    assert rows[0]["skipped_slots"] == 0.0 and rows[0]["kl"] == 0.0
    for weights in ("drop", "renormalise"):
        low, high = (r for r in rows if r["weights"] == weights)
        assert 0.0 <= low["skipped_slots"] < high["skipped_slots"] < 1.0  # a larger threshold skips more
        assert high["kl"] > 0.0
    assert (tmp_path / "pesf_sweep.png").stat().st_size > 0 and "| 0.3 | drop |" in (tmp_path / "PESF.md").read_text()
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]  # the default thread count, stated
    assert meta["threads"] == 1 and meta["command"].endswith("--threads 1")
    assert f"`{meta['command']}`" in (tmp_path / "PESF.md").read_text()


def test_deploy_demo_runs_on_cpu_and_prints_the_mixtral_plan(packed_checkpoint, tmp_path, capsys):
    deploy = _load_script("deploy_24gb")
    result_path = tmp_path / "deploy.json"
    assert deploy.main(["--checkpoint", str(packed_checkpoint), "--batch", "1", "--prompt-len", "32",
                        "--decode-tokens", "2", "--repeats", "1", "--device", "cpu", "--json-out", str(result_path)]) == 0
    printed = capsys.readouterr().out
    assert "PESF skipped" in printed and "mixtral" in printed.lower()
    payload = json.loads(result_path.read_text())
    assert payload["threads"] == 1 and payload["command"].endswith("--threads 1") and payload["command"] in printed
    assert set(payload["results"]) == {"without PESF", "PESF alpha=0.3"}
    for r in payload["results"].values():
        assert r["prefill_tokens_per_second"] > 0 and r["decode_tokens_per_second"] > 0 and r["prompt_perplexity"] > 1


def test_runtime_benchmark_compares_three_variants(packed_checkpoint, tmp_path):
    bench = _load_script("benchmark_runtime")
    out = tmp_path / "BENCHMARKS.md"
    assert bench.main(["--checkpoint", str(packed_checkpoint), "--batch", "1", "--prompt-len", "32", "--decode-tokens", "2",
                       "--repeats", "1", "--out", str(out)]) == 0
    table = out.read_text()
    assert "--threads 1` on " in table and "(1 torch thread(s))" in table  # what the workers ran with, stated
    for variant in ("fp", "packed", "packed+pesf"):
        assert f"| {variant} |" in table, table


def test_qesc_experiments_pairs_methods_and_resumes(tmp_path):
    experiments = _load_script("qesc_experiments")
    argv = ["--models", "tiny-mixtral", "--bits", "2", "--seeds", "0", "1", "--methods", "gptq", "qesc",
            "--settings", "experts", "--nsamples", "4", "--seqlen", "32", "--eval-samples", "4", "--eval-seqlen", "32",
            "--suite-limit", "0", "--out", str(tmp_path)]
    experiments.main(argv)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    methods = sorted((r["key"]["method"], r["key"].get("seed")) for r in rows)
    assert methods == [("fp", None), ("gptq", 0), ("gptq", 1), ("qesc", 0), ("qesc", 1),
                       ("qesc-experts+fp-router", 0), ("qesc-experts+fp-router", 1)]
    fp = next(r for r in rows if r["key"]["method"] == "fp")
    assert fp["bundled-test"]["shift"]["any"] == 0.0 and fp["bundled-test"]["kl"]["q/q"] == pytest.approx(0, abs=1e-9)
    for r in rows:
        if r["key"]["method"] != "fp":
            assert 0 < r["bundled-test"]["shift"]["any"] < 1 and len(r["bundled-test"]["shift_per_layer"]) == 8
    assert all(r["average_bits"] == 2.0 for r in rows if "average_bits" in r)  # experts only: every quantized weight 2-bit
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| tiny-mixtral | experts | 2 | qesc − gptq | 2 |" in report and "qesc − same experts, FP router" in report
    assert (tmp_path / "shift.png").stat().st_size > 0 and (tmp_path / "shift_per_layer.png").stat().st_size > 0
    experiments.main(argv)  # a rerun finds every row done and adds none
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(rows)
    assert (tmp_path / "commands.txt").read_text().startswith("python scripts/qesc_experiments.py --models tiny-mixtral")
    # every row records its thread count, the command states it, and rows of another count are never mixed in
    assert {r["threads"] for r in rows} == {1} and "Torch CPU threads of the rows: 1." in report
    assert (tmp_path / "commands.txt").read_text().splitlines()[0].endswith("--threads 1")
    commands = (tmp_path / "commands.txt").read_text()
    with pytest.raises(SystemExit, match="torch thread"):
        experiments.main(argv + ["--threads", "2"])
    assert (tmp_path / "commands.txt").read_text() == commands
    # every row names the weights it was measured on; rows of other weights (a retrained model) are never resumed
    assert len({r["checkpoint"] for r in rows}) == 1
    stale = [{**r, "checkpoint": "0123456789abcdef"} if r["key"]["method"] == "fp" else r for r in rows]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    commands = (tmp_path / "commands.txt").read_text()
    with pytest.raises(SystemExit, match="measured on other weights"):
        experiments.main(argv)
    assert (tmp_path / "commands.txt").read_text() == commands  # the refused run left no trace


def test_checkpoint_fingerprint_changes_with_any_weight():
    import torch

    experiments = _load_script("qesc_experiments")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    before = experiments.checkpoint_fingerprint(model)
    assert experiments.checkpoint_fingerprint(model) == before  # deterministic
    with torch.no_grad():
        model[1].bias[0] += 1e-6
    assert experiments.checkpoint_fingerprint(model) != before


def test_router_sweep_compares_adam_and_ridge(tmp_path):
    sweep = _load_script("router_sweep")
    out = tmp_path / "sweep.md"
    sweep.main(["--nsamples", "4", "--seqlen", "64", "--lrs", "1e-3", "--steps", "5", "--out", str(out)])
    table = out.read_text()
    assert "| default | adam | auto | 0.001 | 5 |" in table and "| default | ridge | statistics | – | – |" in table
    assert "--threads 1`" in table and "1 torch CPU thread(s)" in table


def test_qesc_report_keeps_one_row_per_key_in_table_order(tmp_path):
    """Two processes sharing results.jsonl may both write a model's FP row; the report counts it once, and lists
    groups by model, setting, numeric bits and method whatever order the rows finished in."""
    experiments = _load_script("qesc_experiments")

    def row(method, bits=None, seed=None, setting="attn4", ppl=50.0):
        key = {"model": "m", "method": method} if method == "fp" else \
            {"model": "m", "setting": setting, "bits": bits, "method": method, "seed": seed}
        entry = {"ppl": {"q/q": ppl, "q/fp": ppl, "fp/q": ppl}, "kl": {"q/q": 0.01}, "shift": {"any": 0.1, "half": 0.1,
                                                                                               "all": 0.0}}
        return {"key": key, "bundled-test": entry}

    rows = [row("gptq", "3", 0), row("fp"), row("qesc", "3", 0, ppl=49.0), row("gptq", "2.5", 0),
            row("qesc", "2.5", 0), row("fp", ppl=48.0), row("rtn", "2", 0, setting="experts")]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(experiments.load_rows(tmp_path / "results.jsonl")) == 6
    experiments.write_markdown(tmp_path / "results.jsonl", tmp_path / "RESULTS.md")
    table = [line.split(" | ")[1:5] for line in (tmp_path / "RESULTS.md").read_text().splitlines()
             if line.startswith("| m | ") and " | n | " not in line and "−" not in line and "→" not in line]
    assert table == [["fp", "16", "–", "fp"], ["experts", "2", "–", "rtn"], ["attn4", "2.5", "–", "gptq"],
                     ["attn4", "2.5", "–", "qesc"], ["attn4", "3", "–", "gptq"], ["attn4", "3", "–", "qesc"]]
    assert "| m | fp | 16 | – | fp | 1 | 48.00 |" in (tmp_path / "RESULTS.md").read_text()  # the later FP row won


def test_qesc_sparse_policy_labels_and_table(tmp_path):
    """"<method>[+<Hessian>]@<policy>" selects --sparse-expert-policy; GAP.md pairs each policy with the same label
    under pool by seed: treated experts (mean over seeds) and the paired differences, by hand below."""
    experiments = _load_script("qesc_experiments")
    assert experiments.method_config("qesc+weighted@weighted-pool") == {
        "method": "qesc", "expert_hessian": "weighted", "sparse_expert_policy": "weighted-pool"}
    assert experiments.method_config("gptq") == {"method": "gptq", "expert_hessian": "routed",
                                                 "sparse_expert_policy": "pool"}

    def row(method, seed, ppl, kl, sparse):
        key = {"model": "m", "setting": "experts", "bits": "2", "method": method, "seed": seed, "min_expert_tokens": 300}
        return {"key": key, "sparse_experts": sparse, "routed_experts": 64,
                "bundled-test": {"ppl": {"q/q": ppl, "q/fp": ppl, "fp/q": ppl}, "kl": {"q/q": kl},
                                 "shift": {"any": 0.1, "half": 0.1, "all": 0.0}}}

    rows = [row("gptq", 0, 50.0, 0.100, 10), row("gptq", 1, 51.0, 0.110, 12),
            row("gptq@rtn", 0, 52.0, 0.130, 10), row("gptq@rtn", 1, 52.0, 0.120, 12),
            row("gptq@gptqmodel", 0, 49.0, 0.090, 0)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    experiments.write_markdown(tmp_path / "results.jsonl", tmp_path / "RESULTS.md")
    gap = (tmp_path / "GAP.md").read_text()
    assert "| m | experts | 2 | 300 | gptq | pool | 2 | 11.0 / 64 | 50.50 ± 0.71 | – | 105.00 ± 7.07 | – |" in gap
    # rtn − pool per seed: ppl +2.0, +1.0; KL x1e3 +30, +10
    assert "| m | experts | 2 | 300 | gptq | rtn | 2 | 11.0 / 64 | 52.00 ± 0.00 | 1.500 ± 0.707 | 125.00 ± 7.07 | 20.00 ± 14.14 |" in gap
    assert "| m | experts | 2 | 300 | gptq | gptqmodel | 1 | 0.0 / 64 | 49.00 | -1.000 | 90.00 | -10.00 |" in gap
    assert gap.index("| gptq | pool |") < gap.index("| gptq | rtn |") < gap.index("| gptq | gptqmodel |")


def test_training_schedule_of_a_continuation_starts_at_its_own_step():
    """A continued run (--init-from at step 3520) warms up and decays over its own steps, ending at 10% of its peak;
    a run from scratch keeps the schedule it always had."""
    import argparse
    import math

    train = _load_script("train_tiny_moe")
    args = argparse.Namespace(lr=1e-3, warmup=100, total_steps=6320)
    assert train.lr_at(3520, args, schedule_start=3520) == pytest.approx(1e-3 / 100)
    assert train.lr_at(3620, args, schedule_start=3520) == pytest.approx(1e-3)  # warm-up done: the peak
    assert train.lr_at(3620 + 1350, args, schedule_start=3520) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # halfway
    assert train.lr_at(6320, args, schedule_start=3520) == pytest.approx(1e-4)
    scratch = argparse.Namespace(lr=2e-3, warmup=200, total_steps=3520)
    progress = (1000 - 200) / (3520 - 200)
    assert train.lr_at(1000, scratch) == pytest.approx(2e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * progress))))


def test_refresh_figures_runs_existing_scripts_with_flags_they_accept(tmp_path):
    """PRINT=1 lists every command without running it; each names a script of this repo and only flags that
    script defines (a renamed flag would otherwise surface hours into a refresh), and states its thread count."""
    import os
    import re
    import subprocess

    out = subprocess.run(["bash", str(REPO / "scripts" / "refresh_figures.sh")], env={**os.environ, "PRINT": "1"},
                         capture_output=True, text=True, check=True).stdout
    commands = [line[2:].split() for line in out.splitlines() if line.startswith("+ ")]
    assert len(commands) >= 15
    stages_seen = set()
    for cmd in commands:
        if "-m" in cmd:
            source = REPO / (cmd[cmd.index("-m") + 1].replace(".", "/") + ".py")
        else:
            source = REPO / next(c for c in cmd if c.endswith(".py"))
        assert source.exists(), cmd
        text = source.read_text()
        for flag in (c for c in cmd if c.startswith("--")):
            assert re.search(rf"[\"']{flag}[\"']", text) or (flag == "--threads" and "add_threads_argument(" in text), \
                (flag, source)
        assert "--threads" in cmd and cmd[cmd.index("--threads") + 1] == "1", cmd
        stages_seen.add(source.name)
    assert {"model_card.py", "run_suite.py", "quantize.py", "pesf_sweep.py", "router_sweep.py",
            "benchmark_runtime.py", "deploy_24gb.py", "qesc_experiments.py"} <= stages_seen


# ---- reproducible figures: every figure script sets its torch thread count from --threads and records it

FIGURE_SCRIPTS = ["scripts/benchmark_runtime.py", "scripts/deploy_24gb.py", "scripts/measure_memory.py",
                  "scripts/measure_real_shape_memory.py", "scripts/quantize_peak.py",
                  "scripts/model_card.py", "scripts/pesf_sweep.py", "scripts/qesc_experiments.py",
                  "scripts/router_sweep.py", "scripts/bench_peers.py", "scripts/profile_quantize.py",
                  "scripts/bench_gptq_solver.py", "scripts/auto_bits_proxy_check.py", "scripts/scaling_law.py",
                  "scripts/gptq_target_fit.py",
                  "eval/run_suite.py"]
NOT_FIGURE_SCRIPTS = {
    "scripts/train_tiny_moe.py": "training; its own --threads is recorded in training_log.json and the model card",
    "scripts/train_tokenizer.py": "tokenizer training, no torch",
    "scripts/mutation_check.py": "runs the test suite on seeded bugs",
    "scripts/make_real_shape_slice.py": "writes synthetic checkpoints (seeded random weights), measures nothing",
    "eval/build_tasks.py": "writes the task files",
    "eval/unigram_baseline.py": "counting in numpy, no thread-dependent arithmetic; its row comes from run_suite.py",
}


def test_every_script_is_classified_as_figure_or_not():
    """A new script in scripts/ or eval/ must be listed: as a figure script it gets the --threads checks below."""
    found = {str(p.relative_to(REPO)) for folder in ("scripts", "eval") for p in (REPO / folder).glob("*.py")}
    assert found - set(FIGURE_SCRIPTS) - set(NOT_FIGURE_SCRIPTS) == set()


@pytest.mark.parametrize("script", FIGURE_SCRIPTS)
def test_every_figure_script_takes_threads(script, capsys):
    """`--threads` is the shared flag (eacmoe.threads): parsed and checked before any work."""
    folder, name = script[:-3].split("/")
    module = _load_script(name, folder)
    with pytest.raises(SystemExit) as exited:
        module.main(["--threads", "0"])
    assert exited.value.code == 2
    assert "argument --threads: must be at least 1" in capsys.readouterr().err


def test_set_threads_reaches_torch_and_child_processes(monkeypatch):
    import os
    import subprocess

    import torch

    from eacmoe.threads import command_line, set_threads, with_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # restored afterwards, like the count below
    before = torch.get_num_threads()
    try:
        assert set_threads(2) == 2 == torch.get_num_threads()
        child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                               capture_output=True, text=True, check=True, env=dict(os.environ))
        assert child.stdout.strip() == "2"  # an lm_eval or worker subprocess computes with the same count
        assert set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert with_threads(["--out", "x"], 1) == ["--out", "x", "--threads", "1"]
    assert with_threads(["--threads", "3", "--out", "x"], 1) == ["--threads", "3", "--out", "x"]
    assert with_threads(["--threads=3"], 1) == ["--threads=3"]
    assert command_line("python scripts/x.py", ["--out", "a b"], 1) == "python scripts/x.py --out 'a b' --threads 1"


def test_run_suite_states_its_command_and_threads(tmp_path, monkeypatch):
    run_suite = _load_script("run_suite", "eval")
    results = {"results": {"eacmoe_cloze": {"acc,none": 0.25, "acc_stderr,none": 0.01}}}
    monkeypatch.setattr(run_suite, "evaluate_model_dir", lambda *a, **k: results)
    out, json_out = tmp_path / "baseline.md", tmp_path / "baseline.json"
    run_suite.main(["--models", "tiny-mixtral", "--tasks", "eacmoe_cloze", "--out", str(out),
                    "--json-out", str(json_out)])
    command = ("python eval/run_suite.py --models tiny-mixtral --tasks eacmoe_cloze "
               f"--out {out} --json-out {json_out} --threads 1")
    assert f"Produced by `{command}` (1 torch CPU thread(s))." in out.read_text()
    payload = json.loads(json_out.read_text())
    assert payload["threads"] == 1 and payload["command"] == command


def test_qesc_method_labels_and_their_paired_twins(tmp_path):
    """A label is <method>[+<expert Hessian>][+fp-target[:A]]; a variant is paired with the label without its last
    option (GAP.md), so `qesc+weighted+fp-target` is compared with `qesc+weighted`, not with plain QESC."""
    experiments = _load_script("qesc_experiments")
    assert experiments.method_config("qesc") == {"method": "qesc", "expert_hessian": "routed",
                                                 "sparse_expert_policy": "pool"}
    assert experiments.method_config("qesc+weighted+fp-target:0.5@rtn") == {
        "method": "qesc", "expert_hessian": "weighted", "gptq_target": "fp:0.5", "sparse_expert_policy": "rtn"}
    assert experiments.label_base("qesc+weighted@rtn") == "qesc+weighted"
    assert experiments.method_config("gptq+mse-grid+act-order")["act_order"] is True
    assert "act_order" not in experiments.method_config("gptq+mse-grid")
    with pytest.raises(SystemExit, match="unknown option"):
        experiments.method_config("qesc+gptaq")

    def row(method, seed, ppl):
        entry = {"ppl": {"q/q": ppl, "q/fp": ppl, "fp/q": ppl}, "kl": {"q/q": 0.01}, "shift": {"any": 0.1, "half": 0.1,
                                                                                               "all": 0.0}}
        return {"key": {"model": "m", "setting": "experts", "bits": "2", "method": method, "seed": seed},
                "bundled-test": entry}

    rows = [row(m, s, p + s) for s in (0, 1) for m, p in (("qesc", 50.0), ("qesc+weighted", 49.0),
                                                          ("qesc+weighted+fp-target", 48.5), ("qesc+fp-target", 49.5))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    experiments.write_markdown(tmp_path / "results.jsonl", tmp_path / "RESULTS.md")
    gap = (tmp_path / "GAP.md").read_text()
    assert "| m | experts | 2: qesc+weighted+fp-target − qesc+weighted | 2 | -0.500 ± 0.000 |" in gap
    assert "| m | experts | 2: qesc+fp-target − qesc | 2 | -0.500 ± 0.000 |" in gap
    assert "2: qesc+weighted − qesc | 2 | -1.000 ± 0.000 |" in gap


def _gap_row(method: str, bits: str | None, ppl: float) -> dict:
    """A qesc_experiments results row of model "m" (attn4, seed 0) whose test perplexity is `ppl` (KL ppl / 1e3)."""
    entry = {"ppl": {"q/q": ppl, "q/fp": ppl, "fp/q": ppl}, "kl": {"q/q": ppl / 1e3},
             "shift": {"any": 0.1, "half": 0.1, "all": 0.0}}
    key = {"model": "m", "method": "fp"} if method == "fp" else {
        "model": "m", "setting": "attn4", "bits": bits, "method": method, "seed": 0}
    return {"key": key, "bundled-test": entry}


def _gap_table(experiments, tmp_path, rows: list[dict]) -> str:
    """GAP.md as qesc_experiments writes it from `rows`."""
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    experiments.write_markdown(tmp_path / "results.jsonl", tmp_path / "RESULTS.md")
    return (tmp_path / "GAP.md").read_text()


def test_qesc_gap_table_compares_an_allocation_with_gptq_at_the_paper_schedule_too(tmp_path):
    """`auto:B` rows get their share of the gap against GPTQ at auto:B and against GPTQ at the paper's B (the
    plain baseline at the same average bits)."""
    experiments = _load_script("qesc_experiments")
    gap = _gap_table(experiments, tmp_path, [_gap_row("fp", None, 40.0), _gap_row("gptq", "2.5", 50.0),
                                             _gap_row("gptq", "auto:2.5", 46.0),
                                             _gap_row("qesc+mse-grid", "auto:2.5", 44.0)])
    assert "| m | attn4 | auto:2.5 | qesc+mse-grid | 1 | 44.00 | 33.3 |" in gap          # (46 - 44) / (46 - 40)
    assert "| m | attn4 | auto:2.5 | gptq (vs GPTQ at 2.5) | 1 | 46.00 | 40.0 |" in gap   # (50 - 46) / (50 - 40)
    assert "| m | attn4 | auto:2.5 | qesc+mse-grid (vs GPTQ at 2.5) | 1 | 44.00 | 60.0 |" in gap


def test_qesc_explicit_schedules_are_short_in_the_tables(tmp_path):
    experiments = _load_script("qesc_experiments")
    every_layer = ",".join(["4:" + "/".join(["2"] * 32)] * 8)
    assert experiments.short_bits(every_layer) == "4:2x32 (all 8 layers)"
    assert experiments.short_bits("3,2,2:2/3") == "3,2,2:2/3" and experiments.short_bits("auto:2.5") == "auto:2.5"
    rows = [{"key": {"model": "m", "setting": "attn4", "bits": bits, "method": "gptq", "seed": 0},
             "bundled-test": {"ppl": {"q/q": 50.0, "q/fp": 50.0, "fp/q": 50.0}, "kl": {"q/q": 0.01},
                              "shift": {"any": 0.1, "half": 0.1, "all": 0.0}}} for bits in (every_layer, "2")]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    experiments.write_markdown(tmp_path / "results.jsonl", tmp_path / "RESULTS.md")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| 4:2x32 (all 8 layers) |" in text and every_layer not in text
    assert text.index("| 2 |") < text.index("| 4:2x32 (all 8 layers) |")


def test_qesc_proxy_labels_allocate_on_the_seeds_tokens_and_pair_with_their_twins(tmp_path):
    """`auto:B+experts+proxy` allocates per routed expert from the in-run proxy on the calibration tokens it is
    given (the CLI without --sensitivity; no file needed), `auto:B+proxy` per layer; the tables pair a proxy row
    with its per-layer twin, with the file's row and with GPTQ at the paper's B."""
    import argparse

    from eacmoe.bit_allocation import auto_expert_bits
    from test_pipeline import calib_ids
    from tiny_models import build

    experiments = _load_script("qesc_experiments")
    parse = experiments.AutoBits.parse
    assert parse("auto:2.5+proxy+experts") == experiments.AutoBits("2.5", per_expert=True, proxy=True)
    assert parse("auto:2.5+experts+proxy").label == "auto:2.5+experts+proxy" and parse("2.5") is None
    with pytest.raises(ValueError, match="suffixes"):
        parse("auto:2.5+expert")
    assert experiments._bits_rank("auto:2.5+proxy") < experiments._bits_rank("3")

    model, _ = build("mixtral")
    args = argparse.Namespace(group_size=8, sensitivity=[])  # no file for this model
    for seed in (0, 1):
        ids = calib_ids(4, 16, seed=seed)
        per_expert = experiments.schedule_for("auto:2.5+experts+proxy", model, "m", args, ids)
        expected = auto_expert_bits("auto:2.5", model, calib_ids=ids, group_size=8, per_expert=True)
        assert per_expert == {"expert_bits": expected.bits, "routed_expert_bits": expected.expert_bits}
        assert per_expert["routed_expert_bits"] is not None
        per_layer = experiments.schedule_for("auto:2.5+proxy", model, "m", args, ids)
        assert per_layer["routed_expert_bits"] is None
        assert per_layer["expert_bits"] == auto_expert_bits("auto:2.5", model, calib_ids=ids, group_size=8).bits
    with pytest.raises(SystemExit, match="needs --sensitivity m=FILE"):
        experiments.schedule_for("auto:2.5+experts", model, "m", args, ids)

    gap = _gap_table(experiments, tmp_path, [
        _gap_row("fp", None, 40.0), _gap_row("gptq", "2.5", 50.0), _gap_row("gptq", "auto:2.5+experts", 45.0),
        _gap_row("gptq", "auto:2.5+proxy", 47.0), _gap_row("gptq", "auto:2.5+experts+proxy", 46.0)])
    assert "| m | attn4 | auto:2.5+experts+proxy | gptq (vs GPTQ at 2.5) | 1 | 46.00 | 40.0 |" in gap
    assert "gptq: auto:2.5+experts+proxy − auto:2.5+proxy (per layer) | 1 | -1.000" in gap
    assert "gptq: auto:2.5+experts+proxy − auto:2.5+experts (the file) | 1 | 1.000" in gap
