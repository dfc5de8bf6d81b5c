"""`python -m eacmoe.quantize`: bad input gets a one-line error and a non-zero exit before any heavy work, and
nothing half-written; --overwrite deletes only what eacmoe wrote; --resume continues only the same model, settings
and calibration; a flag the chosen mode ignores is warned about and config.json records what was used."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from eacmoe import workflow
from eacmoe.adapters import calibration_topk_rule
from eacmoe.assets import TOKENIZER_DIR
from eacmoe.output_dir import MARKER_NAME
from eacmoe.pipeline import LayerwiseQuantizer, QuantizeConfig
from eacmoe.quantize import build_parser, main
from eacmoe.router_calibration import RouterCalibrationConfig

REPO = Path(__file__).resolve().parent.parent
EXPERTS, TOP_K, CONTEXT = 4, 2, 128


def save_tiny(path: Path, model) -> Path:
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


def tiny_mixtral_model(seed: int, **overrides) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=8192, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=EXPERTS,
                        num_experts_per_tok=TOP_K, max_position_embeddings=CONTEXT, **overrides)
    return MixtralForCausalLM(cfg)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", tiny_mixtral_model(seed=0))


@pytest.fixture(scope="module")
def other_tiny_mixtral(tmp_path_factory) -> Path:
    """The same architecture and config as tiny_mixtral, other weights (another training run)."""
    return save_tiny(tmp_path_factory.mktemp("m") / "other", tiny_mixtral_model(seed=1))


@pytest.fixture(autouse=True)
def one_heldout_source(monkeypatch) -> None:
    """Tokenizing WikiText-2 for the evaluation is most of a tiny run's time, and no test here is about it."""
    monkeypatch.setattr(workflow, "HELDOUT_SOURCES", ("bundled-test",))


FAST = ("--nsamples", "2", "--seqlen", "16", "--eval-samples", "2", "--eval-seqlen", "16", "--group-size", "32",
        "--router-steps", "2")


def quantize(capsys, *argv) -> tuple[int, str, str]:
    """`python -m eacmoe.quantize argv` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def interrupted(monkeypatch, capsys, *argv) -> int:
    """The run killed (Ctrl-C) right after its first layer's progress is saved."""
    original = LayerwiseQuantizer.run

    def run_one_layer(self, calib_ids, resume=False, stop_after_layer=None):
        original(self, calib_ids, resume=resume, stop_after_layer=0)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(LayerwiseQuantizer, "run", run_one_layer)
        code, _, err = quantize(capsys, *argv)
    assert "--resume" in err
    return code


def weights(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an exported directory's safetensors files (whatever the format names them)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(file))
    assert tensors, f"no weights in {out}"
    return tensors


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err[-2000:]
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]
    return error_lines[0]


def test_help_explains_every_flag() -> None:
    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.dest


# -- bad input: one line, exit 2, nothing written --------------------------------------------------------------
@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """Files and directories of the wrong kind for the flags below, in tmp_path/inputs."""
    d = tmp_path / "inputs"
    (d / "a_directory").mkdir(parents=True)
    (d / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me, na\xefve r\xe9sum\xe9\n\n".encode("latin-1") * 50)
    (d / "data.csv").write_text("text\nhello\n")
    (d / "lists.jsonl").write_text('["not", "an", "object"]\n')
    (d / "short.txt").write_text("just a few words")
    (d / "a_file").write_text("not a model")
    (d / "no_config").mkdir()
    layers = [{"layer": i, "moe": True, "score": 0.1} for i in range(2)]
    doc = {"schema": "eacmoe.sensitivity/1", "model": "m", "fingerprint": "0", "score_perturbation": "gptq@2"}
    (d / "sensitivity_3_layers.json").write_text(json.dumps({**doc, "layers": [*layers, layers[0]]}))
    (d / "sensitivity_other_weights.json").write_text(json.dumps({**doc, "layers": layers}))
    return d


BAD_INPUTS = {
    "calib-directory": (("--calib", "{inputs}/a_directory"), "is a directory"),
    "calib-latin1": (("--calib", "{inputs}/latin1.txt"), "not UTF-8"),
    "calib-missing": (("--calib", "{inputs}/missing.txt"), "does not exist"),
    "calib-suffix": (("--calib", "{inputs}/data.csv"), ".txt or .jsonl"),
    "calib-jsonl-not-objects": (("--calib", "{inputs}/lists.jsonl"), "JSON object"),
    "calib-unknown-source": (("--calib", "nosuchcorpus"), "unknown calibration source"),
    "calib-too-little-text": (("--calib", "{inputs}/short.txt"), "only"),
    "device-banana": (("--device", "banana"), "--device"),
    "device-missing-gpu": (("--device", "cuda:7"), "cuda:7"),
    "router-lr-negative": (("--router-lr", "-1"), "--router-lr"),
    "router-lr-zero": (("--router-lr", "0"), "--router-lr"),
    "router-lr-nan": (("--router-lr", "nan"), "--router-lr"),
    "router-steps-zero": (("--router-steps", "0"), "--router-steps"),
    "router-topk-zero": (("--router-topk", "0"), "--router-topk"),
    "router-topk-negative": (("--router-topk", "-3"), "--router-topk"),
    "router-topk-above-experts": (("--router-topk", "100"), f"more than the {EXPERTS} experts"),
    "nsamples-zero": (("--nsamples", "0"), "--nsamples"),
    "nsamples-negative": (("--nsamples", "-4"), "--nsamples"),
    "nsamples-not-a-number": (("--nsamples", "abc"), "--nsamples"),
    "seqlen-one": (("--seqlen", "1"), "--seqlen"),
    "seqlen-beyond-context": (("--seqlen", str(CONTEXT + 1)), "context"),
    "eval-samples-zero": (("--eval-samples", "0"), "--eval-samples"),
    "eval-samples-too-many": (("--eval-samples", "100000"), "windows"),
    "eval-seqlen-negative": (("--eval-seqlen", "-16"), "--eval-seqlen"),
    "group-size-zero": (("--group-size", "0"), "--group-size"),
    "group-size-negative": (("--group-size", "-2"), "--group-size"),
    "group-size-not-a-divisor": (("--group-size", "48"), "does not divide"),
    "threads-zero": (("--threads", "0"), "--threads"),
    "attn-bits": (("--attn-bits", "5"), "--attn-bits"),
    "bits": (("--bits", "5"), "bits must be one of"),
    "bits-per-layer-count": (("--bits", "2,2,2"), "2 layers"),
    "method-unknown": (("--method", "awq"), "invalid choice"),
    "expert-hessian-unknown": (("--expert-hessian", "uniform"), "invalid choice"),
    "gptq-target-unknown": (("--gptq-target", "fp:1.5"), "--gptq-target must be"),
    "gptq-target-without-fp-stream": (("--method", "gptq", "--gptq-target", "fp"), "needs the FP stream"),
    "sparse-expert-policy-unknown": (("--sparse-expert-policy", "drop"), "invalid choice"),
    "grid-unknown": (("--grid", "percentile"), "invalid choice"),
    "min-expert-tokens-zero": (("--min-expert-tokens", "0"), "--min-expert-tokens"),
    "bits-auto-out-of-range": (("--bits", "auto:5"), "2 <= B <= 4"),
    "bits-auto-not-a-number": (("--bits", "auto:x"), "auto:B"),
    "bits-auto-rtn-without-file": (("--bits", "auto:2.5", "--method", "rtn"), "needs --sensitivity"),
    "sensitivity-without-auto": (("--sensitivity", "{inputs}/a_file"), "only used with --bits auto"),
    "sensitivity-missing": (("--bits", "auto:2.5", "--sensitivity", "{inputs}/missing.json"), "no such file"),
    "sensitivity-not-json": (("--bits", "auto:2.5", "--sensitivity", "{inputs}/a_file"), "JSON"),
    "sensitivity-layer-count": (("--bits", "auto:2.5", "--sensitivity", "{inputs}/sensitivity_3_layers.json"),
                                "3 layers, the model 2"),
    "sensitivity-other-weights": (("--bits", "auto:2.5", "--sensitivity", "{inputs}/sensitivity_other_weights.json"),
                                  "other weights"),
    "sensitivity-layer-count-per-layer": (("--bits", "auto:2.5", "--no-per-expert-bits", "--sensitivity",
                                           "{inputs}/sensitivity_3_layers.json"), "3 layers, the model 2"),
    "sensitivity-other-weights-per-layer": (("--bits", "auto:2.5", "--no-per-expert-bits", "--sensitivity",
                                             "{inputs}/sensitivity_other_weights.json"), "other weights"),
    "model-missing-directory": (("--model", "/nonexistent/model"), "no such directory"),
    "model-is-a-file": (("--model", "{inputs}/a_file"), "is a file"),
    "model-without-config": (("--model", "{inputs}/no_config"), "no config.json"),
    "model-unknown-name": (("--model", "tiny-mixtrl"), "not a bundled model"),
    "out-is-a-file": (("--out", "{inputs}/a_file", "--overwrite"), "not a directory"),
    "out-under-a-file": (("--out", "{inputs}/a_file/sub/out"), "cannot write"),
}


@pytest.mark.parametrize("args,needle", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_and_leaves_nothing(tiny_mixtral: Path, inputs: Path, tmp_path: Path, capsys,
                                                  args, needle) -> None:
    out = tmp_path / "new" / "out"
    before = {p: p.stat().st_mtime_ns for p in inputs.rglob("*")}
    args = [a.format(inputs=inputs) for a in args]
    code, stdout, err = quantize(capsys, "--model", tiny_mixtral, *FAST, "--out", out, *args)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "new").exists()  # no out, no out.partial, not even their parent
    assert {p: p.stat().st_mtime_ns for p in inputs.rglob("*")} == before
    assert "wrote" not in stdout


def test_bad_input_through_the_real_command(tiny_mixtral: Path, tmp_path: Path) -> None:
    """The same contract from a shell: exit code 2, no traceback, one line (argparse's own errors included)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for args, needle in ((("--router-lr", "-1"), "--router-lr"), (("--nsamples", "x"), "--nsamples")):
        result = subprocess.run([sys.executable, "-m", "eacmoe.quantize", "--model", str(tiny_mixtral), *FAST,
                                 "--out", str(tmp_path / "o"), *args], capture_output=True, text=True, env=env,
                                cwd=REPO, timeout=600)
        assert_one_line_error(result.returncode, result.stderr, needle)
        assert result.stderr.strip().splitlines()[-1].startswith("error:")  # no usage block after it
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_out_may_not_be_the_current_directory(tiny_mixtral: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for out in (".", "..", str(tmp_path)):
        for extra in ((), ("--overwrite",)):
            code, _, err = quantize(capsys, "--model", tiny_mixtral, *FAST, "--out", out, *extra)
            assert_one_line_error(code, err, "current directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "sub"] and not any((tmp_path / "sub").iterdir())


def test_dense_model_is_refused(tmp_path: Path, capsys) -> None:
    cfg = LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    path = save_tiny(tmp_path / "llama", LlamaForCausalLM(cfg))
    code, _, err = quantize(capsys, "--model", path, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "llama", "mixtral")
    assert not (tmp_path / "o.partial").exists()


def test_nan_weights_are_refused_before_any_layer(tmp_path: Path, monkeypatch, capsys) -> None:
    model = tiny_mixtral_model(seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[1, 0, 0] = float("nan")
    path = save_tiny(tmp_path / "nan", model)
    quantized_layers = []
    monkeypatch.setattr(LayerwiseQuantizer, "quantize_layer", lambda self, i, *a: quantized_layers.append(i))
    code, _, err = quantize(capsys, "--model", path, *FAST, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "NaN", "layers.1.mlp.experts.down_proj")
    assert quantized_layers == [] and not (tmp_path / "o.partial").exists()


# -- the output directory -------------------------------------------------------------------------------------
def test_overwrite_deletes_only_what_eacmoe_wrote(tiny_mixtral: Path, tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    code, _, err = quantize(capsys, "--model", tiny_mixtral, *FAST, "--out", mine, "--overwrite")
    assert_one_line_error(code, err, "--overwrite refuses", "did not write")
    assert (mine / "notes.txt").read_text() == "precious" and not (tmp_path / "mine.partial").exists()

    foreign = tmp_path / "run.partial"  # a user's directory where eacmoe would keep its work
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    for extra in ((), ("--resume",), ("--overwrite",)):
        code, _, err = quantize(capsys, "--model", tiny_mixtral, *FAST, "--out", tmp_path / "run", *extra)
        assert_one_line_error(code, err, "run.partial", "did not write")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and not (tmp_path / "run").exists()


def test_full_run_writes_a_marked_directory_and_replaces_only_it(tiny_mixtral: Path, tmp_path: Path) -> None:
    """The real command: a complete directory, never overwritten without --overwrite, replaced with it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "eacmoe.quantize", "--model", str(tiny_mixtral), *FAST, *args],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=600)

    out = tmp_path / "done"
    result = cli("--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"report.json", "config.json", "eacmoe_manifest.json", "modeling_eacmoe.py", "tokenizer.json",
            MARKER_NAME} <= {p.name for p in out.iterdir()}
    assert set(json.loads((out / "eacmoe_manifest.json").read_text())["files"]) <= {p.name for p in out.iterdir()}
    assert json.loads((out / MARKER_NAME).read_text())["tool"] == "eacmoe"
    assert not (tmp_path / "done.partial").exists()
    assert "quant ppl" in result.stdout
    # an existing output directory is never overwritten silently ...
    result = cli("--out", str(out))
    assert_one_line_error(result.returncode, result.stderr, "already exists")
    # ... and --overwrite replaces eacmoe's own directory: a file left in it is gone, the marker is back
    (out / "stale.txt").write_text("from the previous run")
    result = cli("--out", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "stale.txt").exists() and (out / MARKER_NAME).exists()


# -- resume ---------------------------------------------------------------------------------------------------
def progress_state(partial: Path) -> dict:
    return json.loads((partial / ".progress" / "state.json").read_text())


def test_resume_continues_only_the_same_model_settings_and_data(tiny_mixtral: Path, other_tiny_mixtral: Path,
                                                                tmp_path: Path, monkeypatch, capsys, caplog) -> None:
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    args = (*FAST, "--out", out)
    assert interrupted(monkeypatch, capsys, "--model", tiny_mixtral, *args) == 130
    saved = (partial / ".progress" / "state.json").read_text()
    assert progress_state(partial)["completed_layers"] == 1

    # another checkpoint of the same architecture: its layer 1 must not be stitched to this one's layer 0
    code, _, err = quantize(capsys, "--model", other_tiny_mixtral, *args, "--resume")
    assert_one_line_error(code, err, "another model")
    code, _, err = quantize(capsys, "--model", tiny_mixtral, *args, "--resume", "--seed", "1")
    assert_one_line_error(code, err, "seed 0 -> 1")
    other_text = tmp_path / "other_calibration.txt"  # local, so the check runs wherever WikiText-2 is missing
    other_text.write_text(" ".join(f"Another calibration text, sentence number {i}." for i in range(2000)))
    code, _, err = quantize(capsys, "--model", tiny_mixtral, *args, "--resume", "--calib", str(other_text))
    assert_one_line_error(code, err, "calibration tokens")
    assert (partial / ".progress" / "state.json").read_text() == saved  # each refusal left the progress alone

    caplog.clear()
    code, _, err = quantize(capsys, "--model", tiny_mixtral, *args, "--resume")
    assert code == 0, err[-3000:]
    assert not [r for r in caplog.records if "has no effect" in r.getMessage()]  # no flag here is ignored
    resumed = json.loads((out / "report.json").read_text())
    assert [layer["layer"] for layer in resumed["layers"]] == [0, 1]
    assert resumed["threads"] == torch.get_num_threads()
    # what config.json records is the K that was used, not the (absent) flag
    used = calibration_topk_rule(EXPERTS, TOP_K)
    assert [layer["router"]["topk"] for layer in resumed["layers"]] == [used, used]
    assert json.loads((out / "config.json").read_text())["quantization"]["router_calibration"]["topk"] == used
    # the continued run is the uninterrupted one, tensor for tensor
    straight = tmp_path / "straight"
    assert quantize(capsys, "--model", tiny_mixtral, *FAST, "--out", straight)[0] == 0
    a, b = weights(out), weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_without_resume_says_what_progress_it_discards(tiny_mixtral: Path, tmp_path: Path, monkeypatch,
                                                             capsys, caplog) -> None:
    out = tmp_path / "out"
    assert interrupted(monkeypatch, capsys, "--model", tiny_mixtral, *FAST, "--out", out) == 130
    caplog.clear()
    code, _, err = quantize(capsys, "--model", tiny_mixtral, *FAST, "--out", out)
    assert code == 0, err[-3000:]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("discarding the progress of 1 of 2 layers" in w and "out.partial" in w for w in warnings), warnings


# -- no silent flags ------------------------------------------------------------------------------------------
def warned_flags(caplog) -> set[str]:
    return {r.getMessage().split()[0] for r in caplog.records
            if r.levelname == "WARNING" and "has no effect" in r.getMessage()}


def test_ridge_ignores_adam_flags_with_a_warning_and_records_what_it_used(tiny_mixtral: Path, tmp_path: Path,
                                                                          capsys, caplog) -> None:
    out = tmp_path / "ridge"
    threads = torch.get_num_threads()
    asked = 2 if threads == 1 else 1  # not the count the process has anyway
    code, stdout, err = quantize(capsys, "--model", tiny_mixtral, *FAST, "--router-solver", "ridge",
                                 "--router-lr", "0.01", "--router-steps", "7", "--router-topk", "3",
                                 "--threads", asked, "--out", out)
    assert code == 0, err[-3000:]
    assert warned_flags(caplog) == {"--router-lr", "--router-steps"}
    recorded = json.loads((out / "config.json").read_text())["quantization"]
    assert recorded["router_calibration"] == {"loss": "topk-mse", "topk": 3, "solver": "ridge",
                                              "dampings": list(RouterCalibrationConfig(topk=1).ridge_dampings)}
    report = json.loads((out / "report.json").read_text())
    assert [layer["router"]["topk"] for layer in report["layers"]] == [3, 3]
    assert report["quantization"]["router_calibration"] == recorded["router_calibration"]
    assert report["threads"] == asked and f"threads {asked}" in stdout.splitlines()[0]
    assert torch.get_num_threads() == threads  # --threads holds for the run only


@pytest.mark.parametrize("method,args,warned,expected", [
    ("gptq", ("--router-steps", "5", "--router-solver", "ridge", "--router-topk", "3"),
     {"--router-steps", "--router-solver", "--router-topk"}, {"router_calibration": None}),
    ("qesc-mse", ("--router-topk", "3"), {"--router-topk"}, {"router_calibration": {
        "loss": "mse", "topk": EXPERTS, "solver": "adam", "max_steps": 2, "lr": 1e-3}}),
    ("rtn", ("--act-order", "--seed", "3", "--sparse-expert-policy", "rtn", "--min-expert-tokens", "5"),
     {"--act-order", "--seed", "--sparse-expert-policy", "--min-expert-tokens", "--nsamples", "--seqlen",
      "--router-steps"},
     {"act_order": False, "calibration": None, "sparse_expert_policy": None, "min_expert_tokens": None,
      "router_calibration": None}),
    ("gptq", ("--sparse-expert-policy", "gptqmodel", "--min-expert-tokens", "5"), {"--min-expert-tokens", "--router-steps"},
     {"sparse_expert_policy": "gptqmodel"}),  # GPTQModel's rule has its own threshold
    ("gptq", ("--sparse-expert-policy", "weighted-pool", "--min-expert-tokens", "5"), {"--router-steps"},
     {"sparse_expert_policy": "weighted-pool", "min_expert_tokens": 5}),
])
def test_flags_the_method_ignores_are_warned_about_and_not_recorded(tiny_mixtral: Path, tmp_path: Path, capsys,
                                                                   caplog, method, args, warned, expected) -> None:
    out = tmp_path / method
    code, _, err = quantize(capsys, "--model", tiny_mixtral, *FAST, "--method", method, *args, "--out", out)
    assert code == 0, err[-3000:]
    assert warned_flags(caplog) == warned
    recorded = json.loads((out / "config.json").read_text())["quantization"]
    assert {k: recorded[k] for k in expected} == expected


def _weights_per_value(capsys, tiny_mixtral: Path, tmp_path: Path, flag: str, values: tuple[str, ...]) -> dict:
    """One quick run per value of `flag`: each must record the value in config.json; their exported tensors."""
    runs = {}
    for value in values:
        out = tmp_path / value.replace(":", "_")
        code, _, err = quantize(capsys, "--model", tiny_mixtral, *FAST, flag, value, "--out", out)
        assert code == 0, err[-3000:]
        assert json.loads((out / "config.json").read_text())["quantization"][flag[2:].replace("-", "_")] == value
        runs[value] = weights(out)
    return runs


def test_gptq_target_fp_is_recorded_and_changes_only_the_routed_experts(tiny_mixtral: Path, tmp_path: Path,
                                                                          capsys) -> None:
    runs = _weights_per_value(capsys, tiny_mixtral, tmp_path, "--gptq-target", ("quantized", "fp"))
    # in the first layer only the experts change (later layers see other inputs, so everything there may differ)
    differ = {k for k in runs["fp"] if k.startswith("model.layers.0.")
              and not torch.equal(runs["fp"][k], runs["quantized"][k])}
    assert differ and all(".mlp.experts." in k for k in differ), sorted(differ)[:5]


def test_grid_mse_is_recorded_and_changes_scales_only_where_the_search_shrinks(tiny_mixtral: Path, tmp_path: Path,
                                                                              capsys) -> None:
    runs = _weights_per_value(capsys, tiny_mixtral, tmp_path, "--grid", ("minmax", "mse"))
    # a matrix's first group is fitted on its FP weights in both runs (no GPTQ feedback yet): the search starts at
    # min/max and only shrinks, so those scales (row 0 of the packed [groups, out]) can only get smaller
    scales = [k for k in runs["mse"] if k.startswith("model.layers.0.") and k.endswith(".scales")]
    assert scales
    first = {grid: {k: runs[grid][k][0].float() for k in scales} for grid in runs}
    assert all(bool((first["mse"][k] <= first["minmax"][k]).all()) for k in scales)
    assert sum(int((first["mse"][k] < first["minmax"][k]).sum()) for k in scales) > 0


def test_router_topk_zero_never_means_the_default() -> None:
    with pytest.raises(ValueError, match="router_topk"):
        QuantizeConfig(expert_bits=[2], router_topk=0)


# -- formats --------------------------------------------------------------------------------------------------
def test_gptq_and_dequantized_formats(tiny_mixtral: Path, tmp_path: Path, capsys) -> None:
    gptq = tmp_path / "gptq"
    code, _, err = quantize(capsys, "--model", tiny_mixtral, *FAST, "--format", "gptq", "--out", gptq)
    assert code == 0, err[-3000:]
    quantize_config = json.loads((gptq / "quantize_config.json").read_text())
    assert quantize_config["format"] == "gptq" and quantize_config["quant_method"] == "gptq"
    assert json.loads((gptq / "config.json").read_text())["quantization_config"] == quantize_config
    keys = set(weights(gptq))
    assert "model.layers.0.mlp.experts.3.down_proj.qweight" in keys and "model.layers.0.mlp.gate.weight" in keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)
    assert (gptq / MARKER_NAME).exists()

    dequantized = tmp_path / "dequantized"
    code, _, err = quantize(capsys, "--model", tiny_mixtral, *FAST, "--format", "dequantized", "--out", dequantized)
    assert code == 0, err[-3000:]
    model, info = AutoModelForCausalLM.from_pretrained(dequantized, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not (dequantized / "modeling_eacmoe.py").exists()
