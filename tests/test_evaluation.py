"""The eval stage (eacmoe.evaluation, `python -m eacmoe.eval`) on a tiny random Mixtral saved with the bundled
tokenizer: resume without recomputation, the fp cell against the model's own forward, the codecs' bound and bytes,
the quantized bits against the packed layout, and bad input as one line."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eacmoe import eval as eval_cli
from eacmoe import evaluation
from eacmoe.codecs import available_cpus, get_codec, packed_bits
from eacmoe.evaluation import Cell, Method, SweepContext, SweepError, SweepSettings, expert_matrices, run_sweep
from eacmoe.heldout import heldout_sequences
from eacmoe.workflow import load_model

GROUP = 32  # divides the tiny model's widths (64 hidden, 96 intermediate)
SETTINGS = SweepSettings(eval_samples=2, eval_seqlen=32, nsamples=4, seqlen=32, group_size=GROUP, threads=1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import mixtral_with_bundled_tokenizer

    out = tmp_path_factory.mktemp("tiny-mixtral")
    model, tokenizer = mixtral_with_bundled_tokenizer()
    with torch.no_grad():  # experts of different scales (as trained ones are): each matrix needs its own bound
        for layer in model.model.layers:
            for e in range(model.config.num_local_experts):
                layer.mlp.experts.gate_up_proj[e] *= (1 + e) / 4
                layer.mlp.experts.down_proj[e] *= (1 + e) / 4
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def context(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir), torch.float32)
    return SweepContext(model, tokenizer, SETTINGS)


def _counting(monkeypatch, name: str, fail_on_call: int | None = None) -> list[str]:
    """Replace METHODS[name] by a wrapper recording each build's target (raising at call `fail_on_call`)."""
    original = evaluation.METHODS[name]
    calls: list[str] = []

    def build(ctx, target):
        calls.append(target)
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise KeyboardInterrupt  # the sweep is interrupted while building this cell
        return original.build(ctx, target)

    monkeypatch.setitem(evaluation.METHODS, name, Method(original.kind, build))
    return calls


def test_interrupted_sweep_resumes_without_recomputing(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    cells = [Cell("fp"), Cell("rtn", "2"), Cell("rtn", "3"), Cell("sz3", "rel:0.3")]
    calls = _counting(monkeypatch, "rtn", fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(str(tiny_dir), cells, SETTINGS, out)
    first = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["cell"] for line in first] == ["fp", "rtn@2"]
    with (out / "results.jsonl").open("a") as f:
        f.write('{"cell": "rtn@3", "bits": {"numel"')  # a line cut short by a crash mid-write

    calls = _counting(monkeypatch, "rtn")
    fp_calls = _counting(monkeypatch, "fp")
    rows = run_sweep(str(tiny_dir), cells, SETTINGS, out)
    assert calls == ["3"] and fp_calls == []  # only the cells that were not finished
    lines = (out / "results.jsonl").read_text().splitlines()
    assert lines[:2] == first and len(lines) == 4
    assert sorted(r["cell"] for r in rows) == ["fp", "rtn@2", "rtn@3", "sz3@rel:0.3"]
    report = (out / "REPORT.md").read_text()
    assert all(f"| {c.label} |" in report for c in cells) and (out / "pareto.png").stat().st_size > 0
    # the codec study times the sz3 cell's bound with 1 and all workers, and draws SZ3's error
    assert report.count("| sz3 | sz3@rel:0.3 | rel:0.3 |") == (1 if available_cpus() == 1 else 2)
    assert "![SZ3 error against the Normal model](sz3_error.png)" in report and (out / "sz3_error.png").exists()

    # a rerun with all cells done builds nothing; other settings or other weights are refused, file untouched
    calls = _counting(monkeypatch, "rtn")
    run_sweep(str(tiny_dir), cells, SETTINGS, out)
    assert calls == []
    with pytest.raises(SweepError, match="other settings .*eval_samples"):
        run_sweep(str(tiny_dir), cells, SweepSettings(**{**SETTINGS.__dict__, "eval_samples": 3}), out)
    rewritten = [json.dumps({**json.loads(line), "fingerprint": "0123456789abcdef"}) for line in lines]
    (out / "results.jsonl").write_text("\n".join(rewritten) + "\n")
    with pytest.raises(SweepError, match="other weights"):
        run_sweep(str(tiny_dir), cells, SETTINGS, out)
    assert (out / "results.jsonl").read_text().splitlines() == rewritten


def test_fp_cell_matches_the_models_own_forward(tiny_dir, tmp_path):
    rows = run_sweep(str(tiny_dir), [Cell("fp")], SETTINGS, tmp_path / "fp")
    (row,) = rows
    model, tokenizer = load_model(str(tiny_dir), torch.float32)
    ids = heldout_sequences("bundled-test", tokenizer, SETTINGS.eval_samples, SETTINGS.eval_seqlen)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    own_ppl = math.exp(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item())
    assert row["bundled-test"]["ppl"] == pytest.approx(own_ppl, rel=1e-5)
    assert row["bundled-test"]["kl"] == 0.0
    assert row["bundled-test"]["shift"] == {"all": 0.0, "any": 0.0, "half": 0.0}
    numel = sum(w.numel() for w in expert_matrices(model).values())
    assert row["bits"]["bits_per_weight"] == 16.0 and row["bits"]["numel"] == numel  # the bf16 checkpoint


@pytest.mark.parametrize("codec, target", [("sz3", "rel:0.3"), ("zfp", "bpw:3")])
def test_codec_cell_respects_its_bound_and_counts_real_bytes(context, codec, target):
    fp = {n: w.clone() for n, w in expert_matrices(context.fp_model).items()}
    built = evaluation.METHODS[codec].build(context, target)
    new = expert_matrices(built.model)
    assert new.keys() == fp.keys()
    if target.startswith("rel:"):
        bounds = [0.3 * float(np.abs(w.double().numpy()).mean()) for w in fp.values()]
    else:
        search = context.bound_search(codec, evaluation.parse_bound(target))
        bounds = list(search.abs_bounds)
        assert built.bits.bits_per_weight == pytest.approx(3.0, rel=0.02)
    real_bytes = 0
    for (name, w), bound in zip(fp.items(), bounds):
        error = (new[name].double() - w.double()).abs().max().item()
        assert 0 < error <= bound, name  # lossy, and within the bound
        real_bytes += len(get_codec(codec).compress(w.numpy(), bound).to_bytes())
    assert built.bits.total_bits == 8 * real_bytes
    assert built.bits_moved == built.bits
    assert torch.equal(built.model.model.layers[0].self_attn.q_proj.weight,
                       context.fp_model.model.layers[0].self_attn.q_proj.weight)


def test_quantized_cell_counts_the_packed_tensors(context, monkeypatch):
    quantizers = []

    class Recording(evaluation.LayerwiseQuantizer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            quantizers.append(self)

    monkeypatch.setattr(evaluation, "LayerwiseQuantizer", Recording)
    built = evaluation.METHODS["gptq"].build(context, "2")
    (quantizer,) = quantizers
    assert built.bits.total_bits == sum(packed_bits(qw).total_bits for qw in quantizer.quantized.values())
    # the packed layout in closed form: 2-bit codes and zeros, fp16 scales per group, int32 g_idx per input column
    closed_form = 0
    for w in expert_matrices(context.fp_model).values():
        rows, columns = w.shape
        groups = columns // GROUP
        closed_form += 2 * rows * columns + 2 * groups * rows + 16 * groups * rows + 32 * columns
    assert built.bits.total_bits == closed_form
    assert built.bits_moved.total_bits < built.bits.total_bits  # zstd gains on the packed codes
    q_attention = built.model.model.layers[1].self_attn.o_proj.weight
    assert torch.equal(q_attention, context.fp_model.model.layers[1].self_attn.o_proj.weight)  # attention stays FP
    name, w = next(iter(expert_matrices(built.model).items()))
    assert torch.equal(w, quantizer.quantized[name].dequantize().to(w.dtype))  # the model uses the codes


def test_qesc_pesf_cell_reuses_the_qesc_model_and_skips_experts(context, monkeypatch):
    planned = evaluation.plan_cells(["qesc+pesf", "rtn", "qesc"], ["2", "3"])
    assert [c.label for c in planned] == ["rtn@2", "rtn@3", "qesc@2", "qesc+pesf@2", "qesc@3", "qesc+pesf@3"]
    qesc_calls = _counting(monkeypatch, "qesc")
    qesc = context.built(Cell("qesc", "2"))
    pesf = context.built(Cell("qesc+pesf", "2"))
    assert qesc_calls == ["2"]  # QESC+PESF adds PESF to the QESC model of the same bits, not a second QESC run
    assert pesf.bits == qesc.bits and pesf.details["pesf_alpha"] == SETTINGS.pesf_alpha
    ids = heldout_sequences("bundled-test", context.tokenizer, 2, SETTINGS.eval_seqlen)
    with torch.no_grad():
        assert torch.equal(pesf.model.lm_head.weight, qesc.model.lm_head.weight)
        skipped = pesf.model(ids).logits
        plain = qesc.model(ids).logits
    assert not hasattr(qesc.model, "pesf_stats")  # the QESC cell's model is left without PESF
    assert not torch.allclose(skipped, plain)
    references = {"bundled-test": evaluation.measure_fp_reference(context.fp_model, ids, SETTINGS.batch_size)}
    row = evaluation.evaluate_model(context, pesf.model, {"bundled-test": ids}, references)
    assert 0 < row["pesf_skipped_slots"] < 1


@pytest.mark.parametrize("argv, message", [
    (["--methods", "fp", "awq"], "unknown method 'awq'"),
    (["--methods", "rtn", "--bits", "5"], "bits must be one of"),
    (["--methods", "sz3", "--bits", "rel:x"], "is not a number"),
    (["--methods", "sz3", "--bits", "bpw:0.01"], "cannot go down to 0.01 bits per weight"),
    (["--methods", "fp", "--limit", "0"], "must be at least 1"),
    (["--methods", "rtn", "--group-size", "48"], "does not divide"),
])
def test_bad_input_is_one_line(tiny_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert _exit_code(["--model", str(tiny_dir), "--out", str(out), "--limit", "2", *argv]) == 2
    _assert_one_error_line(capsys.readouterr().err, message)
    assert not out.exists()


def test_bad_paths_are_one_line(tiny_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for argv, message in ((["--model", str(tiny_dir), "--out", str(a_file)], "is not a directory"),
                          (["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "cannot load model")):
        assert _exit_code([*argv, "--methods", "fp", "--limit", "2"]) == 2
        _assert_one_error_line(capsys.readouterr().err, message)
    assert a_file.read_text() == "x" and not (tmp_path / "o").exists()


def _exit_code(argv: list[str]) -> int:
    """The CLI's exit code: returned, or raised by argparse as SystemExit."""
    try:
        return eval_cli.main(argv)
    except SystemExit as exc:
        return exc.code


def _assert_one_error_line(err: str, message: str) -> None:
    """One `error: ...` line, last on stderr (transformers' loading bar may come before it), no traceback."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0] and message in errors[0], err


def test_report_shows_suite_accuracy_with_the_fp_standard_error(tmp_path):
    settings = {**SETTINGS.as_dict(), "suite_tasks": ["eacmoe_cloze", "eacmoe_nextsent"], "suite_limit": 100}

    def row(cell, method, bpw, cloze, nextsent):
        return {"cell": cell, "method": method, "target": None, "model": "m", "fingerprint": "f",
                "settings": settings, "bits": {"bits_per_weight": bpw}, "bits_moved": {"bits_per_weight": bpw},
                "bundled-test": {"ppl": 50.0, "kl": 0.1, "shift": {"any": 0.1, "half": 0.1, "all": 0.0}},
                "suite": {"cloze_acc": cloze, "cloze_acc_stderr": 0.016, "nextsent_acc": nextsent,
                          "nextsent_acc_stderr": 0.024, "nextsent_acc_norm": 0.5}}

    evaluation.write_report([row("fp", "fp", 16.0, 0.12, 0.33), row("gptq@2", "gptq", 2.27, 0.0875, 0.3275)],
                            tmp_path)
    report = (tmp_path / "REPORT.md").read_text()
    assert "| cloze_acc % | nextsent_acc % |" in report
    assert "| 8.8 | 32.8 |" in report  # gptq@2: 8.75 and 32.75 in points
    assert "(100 items per task, standard error at FP cloze 1.6, nextsent 2.4 points)" in report
