"""scripts/bench_peers.py's own logic: ratios, tables, error lines and the per-child measurement (no peer is run)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from gptqmodel_env import gptqmodel_import_guard

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_peers.py"


@pytest.fixture(scope="module")
def bp():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def canned_rows() -> list[dict]:
    ev = lambda ppl: {"bundled-test": {"ppl": ppl, "kl": 0.1, "tokens": 100}}  # noqa: E731
    return [
        {"model": "m", "scheme": "w2g64", "method": "eacmoe-gptq", "seconds": 10.0, "cpu_seconds": 8.0,
         "peak_rss_bytes": 1_000_000_000, "eval": ev(50.0)},
        {"model": "m", "scheme": "w2g64", "method": "gptqmodel-default", "seconds": 40.0, "cpu_seconds": 60.0,
         "peak_rss_bytes": 1_500_000_000, "eval": ev(55.0)},
        {"model": "m", "scheme": "w2g64", "method": "llmcompressor-gptq", "error": "ImportError: no module x"},
        # another scheme: its ratios must come from its own eacmoe-gptq row, not the first scheme's
        {"model": "m", "scheme": "w4g64", "method": "eacmoe-gptq", "seconds": 5.0, "cpu_seconds": 4.0,
         "peak_rss_bytes": 2_000_000_000, "eval": ev(45.0)},
        {"model": "m", "scheme": "w4g64", "method": "eacmoe-qesc", "seconds": 15.0, "cpu_seconds": 2.0,
         "peak_rss_bytes": 1_000_000_000, "eval": ev(44.0)},
    ]


def test_ratios_are_to_eacmoe_gptq_of_the_same_model_and_scheme(bp):
    rows = bp.add_ratios(canned_rows())
    by = {(r["scheme"], r["method"]): r for r in rows}
    assert by["w2g64", "eacmoe-gptq"]["time_ratio"] == 1.0
    assert by["w2g64", "gptqmodel-default"]["time_ratio"] == pytest.approx(4.0)
    assert by["w2g64", "gptqmodel-default"]["cpu_ratio"] == pytest.approx(7.5)
    assert by["w2g64", "gptqmodel-default"]["peak_ratio"] == pytest.approx(1.5)
    assert by["w4g64", "eacmoe-qesc"]["time_ratio"] == pytest.approx(3.0)
    assert by["w4g64", "eacmoe-qesc"]["cpu_ratio"] == pytest.approx(0.5)
    assert by["w4g64", "eacmoe-qesc"]["peak_ratio"] == pytest.approx(0.5)
    assert by["w2g64", "llmcompressor-gptq"]["time_ratio"] is None


def test_summary_is_the_median_of_successful_runs(bp):
    runs = [{"returncode": 0, "seconds": s, "cpu_seconds": s / 2, "peak_rss_bytes": p, "quantize_seconds": None}
            for s, p in ((3.0, 30), (1.0, 10), (2.0, 50))]
    runs.append({"returncode": 1, "seconds": 100.0, "cpu_seconds": 100.0, "peak_rss_bytes": 999})
    summary = bp.summarize_runs(runs)
    assert summary["seconds"] == 2.0 and summary["cpu_seconds"] == 1.0 and summary["peak_rss_bytes"] == 30
    assert summary["seconds_all"] == [3.0, 1.0, 2.0] and summary["quantize_seconds"] is None


def test_tables_show_ratios_and_the_failure_line(bp):
    rows = bp.add_ratios(canned_rows())
    table = bp.markdown_table(rows, ["bundled-test"])
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    gm = next(line for line in lines if "gptqmodel-default" in line).split(" | ")
    assert gm[3:9] == ["40.0", "4.00", "60.0", "7.50", "1.50", "1.50"]
    assert gm[9] == "55.00 / 0.100"
    failed = next(line for line in lines if "llmcompressor-gptq" in line)
    assert "failed: ImportError: no module x" in failed
    assert all(line.count(" | ") == lines[0].count(" | ") for line in lines[2:])  # every row has every column
    front = bp.front_page_table(rows, "m", "w2g64").splitlines()
    assert front[2:] == ["| eacmoe-gptq | 1.00 | 1.00 | 1.00 | 50.00 |",
                         "| gptqmodel-default | 4.00 | 7.50 | 1.50 | 55.00 |",
                         "| llmcompressor-gptq | failed | - | - | - |"]


@pytest.mark.parametrize("log,line", [
    ("loading\nTraceback (most recent call last):\n  File x\nValueError: bad shape\n", "ValueError: bad shape"),
    ("step\nerror: --bits must be one of 2, 3, 4, 8\n", "error: --bits must be one of 2, 3, 4, 8"),
    ("RuntimeError: first\nmore output\ntorch.OutOfMemoryError: CUDA out of memory\nclean-up\n",
     "torch.OutOfMemoryError: CUDA out of memory"),
    ("just the last line\n\n", "just the last line"),
    ("", "(no output)"),
])
def test_error_line(bp, log, line):
    assert bp.error_line(log) == line


def test_parse_scheme(bp):
    assert bp.parse_scheme("w2g64") == bp.Scheme("w2g64", 2, 64)
    assert bp.parse_scheme("w4g-1").group_size == -1
    with pytest.raises(argparse.ArgumentTypeError):
        bp.parse_scheme("w5g64")


def test_a_failed_peer_gives_a_row_with_its_error_line(bp, tmp_path):
    crash = "import sys; print('loading'); sys.stderr.write('ImportError: peer needs CUDA\\n'); sys.exit(3)"
    method = bp.Method("broken-peer", "eacmoe", lambda job: [sys.executable, "-c", crash], lambda job: "-")
    job = bp.Job(model="m", model_dir=str(tmp_path), scheme=bp.Scheme("w2g64", 2, 64), calib_file="", out_dir="",
                 threads=1, nsamples=1, seqlen=2, calib="bundled", seed=0, damp_percent=0.01, llmc_python="")
    bench = bp.Bench(argparse.Namespace(timeout=60, reuse_runs=True), tmp_path)
    run = bp._quantize_once(bench, method, job, tmp_path, 0)
    assert run["returncode"] == 3 and run["error"] == "ImportError: peer needs CUDA"
    assert bp._quantize_once(bench, method, job, tmp_path, 0)["returncode"] == 3  # a failed run is never reused
    # a recorded successful run of the same command is reused (the child is not run again); another command is not
    recorded = {**run, "returncode": 0, "seconds": 1.5}
    recorded.pop("error")
    (tmp_path / "broken-peer-0.run.json").write_text(json.dumps(recorded))
    assert bp._quantize_once(bench, method, job, tmp_path, 0) == recorded
    (tmp_path / "broken-peer-0.run.json").write_text(json.dumps({**recorded, "command": "other"}))
    assert bp._quantize_once(bench, method, job, tmp_path, 0)["returncode"] == 3
    row = {"model": "m", "scheme": "w2g64", "method": "broken-peer", "error": run["error"]}
    assert "failed: ImportError: peer needs CUDA" in bp.markdown_table([row], ["bundled-test"])


MEASURE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_peers as bp
assert "torch" not in sys.modules  # a big parent would carry its peak into every child's ru_maxrss
grab = ("import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); t = time.process_time()\\n"
        "while time.process_time() - t < 0.3: pass")
out = {}
for name, code in (("grab", grab), ("small", "pass")):
    m = bp.run_measured([sys.executable, "-c", code], bp.Path(sys.argv[2]) / (name + ".log"))
    out[name] = [m.returncode, m.peak_rss_bytes, m.cpu_seconds, m.seconds]
print(json.dumps(out))
"""


def test_peak_rss_and_cpu_time_are_the_childs_own(tmp_path):
    # measured from a small parent (this pytest process holds torch: its peak would be every child's floor);
    # the expected numbers come from the child's own allocation (300 MiB, every page touched) and busy loop
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(SCRIPT.parent), str(tmp_path)], capture_output=True,
                          text=True, check=True)
    out = json.loads(proc.stdout)
    (rc, peak, cpu, wall), (_, small_peak, _, _) = out["grab"], out["small"]
    assert rc == 0
    assert small_peak < 100 * 2**20
    assert 300 * 2**20 < peak < small_peak + 340 * 2**20
    assert cpu >= 0.3 and wall >= cpu * 0.5


def test_merged_runs_keep_every_row_and_command_and_refuse_other_settings(bp):
    meta = {"command": "python scripts/bench_peers.py --models a", "machine": "2 cores", "calib": "bundled",
            "nsamples": 128, "seqlen": 256, "seed": 0, "eval_samples": 16, "eval_seqlen": 256, "damp": 0.01,
            "threads": 1, "versions": {"torch": "2.13.0"}}
    a = {"meta": meta, "sources": ["bundled-test"], "rows": canned_rows()[:2]}
    b = {"meta": {**meta, "command": "python scripts/bench_peers.py --models b", "versions": {"llmcompressor": "0.14"}},
         "sources": ["bundled-test", "wikitext2"], "rows": canned_rows()[3:]}
    merged = bp.merge_results([a, b])
    assert [{k: v for k, v in r.items() if not k.endswith("_ratio")} for r in merged["rows"]] == \
        canned_rows()[:2] + canned_rows()[3:]
    assert merged["sources"] == ["bundled-test", "wikitext2"]
    assert "--models a" in merged["meta"]["command"] and "--models b" in merged["meta"]["command"]
    assert merged["meta"]["versions"] == {"torch": "2.13.0", "llmcompressor": "0.14"}
    with pytest.raises(SystemExit, match="nsamples"):
        bp.merge_results([a, {**b, "meta": {**b["meta"], "nsamples": 16}}])


def test_a_peer_run_on_its_own_gets_its_ratio_to_eacmoe_when_merged(bp):
    # real-shape slices run one method per invocation (side by side); the merged table must still say how a peer
    # compares: its ratios are recomputed against the eacmoe-gptq row of the same model and scheme
    meta = {"command": "c", "machine": "2 cores", "calib": "bundled", "nsamples": 16, "seqlen": 512, "seed": 0,
            "eval_samples": 2, "eval_seqlen": 256, "damp": 0.01, "threads": 1, "versions": {}}
    eacmoe_run = {"meta": meta, "sources": [], "rows": bp.add_ratios(canned_rows()[:1])}
    peer_run = {"meta": meta, "sources": [], "rows": bp.add_ratios(canned_rows()[1:2])}
    assert peer_run["rows"][0]["cpu_ratio"] is None  # alone, it has nothing to be a ratio of
    peer = bp.merge_results([eacmoe_run, peer_run])["rows"][1]
    assert peer["cpu_ratio"] == pytest.approx(7.5) and peer["peak_ratio"] == pytest.approx(1.5)


def test_a_real_shape_slice_is_cost_only(bp, tmp_path):
    # a slice (random weights) gets no held-out numbers: its cells say so instead of showing a perplexity
    assert not bp.is_real_shape_slice(str(tmp_path))
    (tmp_path / "slice.json").write_text("{}")
    assert bp.is_real_shape_slice(str(tmp_path))
    row = {**canned_rows()[0], "eval_skipped": bp.SLICE_NOTE, "time_ratio": 1.0, "cpu_ratio": 1.0, "peak_ratio": 1.0}
    line = bp.markdown_table([row], ["bundled-test", "wikitext2"]).splitlines()[-1]
    assert line.count("not measured (cost only)") == 2 and "50.00" not in line


def test_eacmoe_rows_use_the_peers_grid_and_the_default_row_the_cli_defaults(bp, tmp_path):
    from eacmoe.quantize import build_parser

    job = bp.Job(model="m", model_dir=str(tmp_path), scheme=bp.parse_scheme("w2g64"), calib_file="c", out_dir="o",
                 threads=1, nsamples=4, seqlen=8, calib="bundled", seed=0, damp_percent=0.01, llmc_python="p")
    like_for_like = build_parser().parse_args(bp.METHODS["eacmoe-qesc"].command(job)[3:])
    default = build_parser().parse_args(bp.METHODS["eacmoe-default"].command(job)[3:])
    cli_defaults = build_parser().parse_args([])
    assert (like_for_like.method, like_for_like.grid) == ("qesc", "minmax")
    assert (default.method, default.grid) == (cli_defaults.method, cli_defaults.grid) == ("qesc", "mse")
    assert default.bits == "2" and default.attn_bits == 2 and default.group_size == 64


def _gptqmodel_config(**kwargs):
    """GPTQModel's QuantizeConfig, imported and built without leaking its import side effects (gptqmodel_env)."""
    with gptqmodel_import_guard():
        pytest.importorskip("gptqmodel")
        from gptqmodel import QuantizeConfig

        return QuantizeConfig(**kwargs)


def test_a_scheme_with_attention_bits_reaches_every_method(bp, tmp_path):
    from eacmoe.quantize import build_parser

    scheme = bp.parse_scheme("w2a4g128")
    assert (scheme.bits, scheme.attention_bits, scheme.group_size) == (2, 4, 128)
    assert bp.parse_scheme("w2g64").attention_bits == 2
    with pytest.raises(Exception, match="wBaAgG"):
        bp.parse_scheme("w2a5g64")
    job = bp.Job(model="m", model_dir=str(tmp_path), scheme=scheme, calib_file="c", out_dir="o", threads=1,
                 nsamples=4, seqlen=8, calib="bundled", seed=0, damp_percent=0.01, llmc_python="p")
    eacmoe_args = build_parser().parse_args(bp.METHODS["eacmoe-gptq"].command(job)[3:])
    assert (eacmoe_args.bits, eacmoe_args.attn_bits) == ("2", 4)
    for name in ("gptqmodel-matched", "gptqmodel-default", "llmcompressor-gptq"):
        worker = bp.build_parser().parse_args(bp.METHODS[name].command(job)[2:])
        assert (worker.bits, worker.attn_bits) == (2, 4), name
    # GPTQModel's own matching of the override: attention 4-bit, experts and shared experts at the default 2
    qcfg = _gptqmodel_config(bits=2, group_size=128, dynamic=bp.gptqmodel_dynamic(4))
    assert qcfg.dynamic_get("model.layers.3.self_attn.o_proj", "bits") == 4
    assert qcfg.dynamic_get("model.layers.3.mlp.experts.7.down_proj", "bits") is None
    assert qcfg.dynamic_get("model.layers.3.mlp.shared_expert.up_proj", "bits") is None
    # without attention bits the commands are the ones recorded before (their runs stay reusable)
    plain = bp.Job(**{**job.__dict__, "scheme": bp.parse_scheme("w2g128")})
    assert "--attn-bits" not in bp.METHODS["gptqmodel-matched"].command(plain)


def test_seed_summary_pairs_each_method_with_eacmoe_gptq_of_the_same_seed(bp):
    meta = {"command": "c", "machine": "2 cores", "calib": "bundled", "nsamples": 128, "seqlen": 256, "seed": 0,
            "eval_samples": 16, "eval_seqlen": 256, "damp": 0.01, "threads": 1, "versions": {}}

    def run(seed: int, gptq: float, peer: float) -> dict:
        ev = lambda ppl, kl: {"bundled-test": {"ppl": ppl, "kl": kl, "tokens": 100}}  # noqa: E731
        return {"meta": {**meta, "seed": seed}, "sources": ["bundled-test"], "rows": [
            {"model": "m", "scheme": "w2a4g64", "method": "fp", "eval": ev(40.0, 0.0)},
            {"model": "m", "scheme": "w2a4g64", "method": "eacmoe-gptq", "eval": ev(gptq, 0.1)},
            {"model": "m", "scheme": "w2a4g64", "method": "gptqmodel-matched", "eval": ev(peer, 0.2)},
            {"model": "m", "scheme": "w2a4g64", "method": "llmcompressor-gptq", "error": "ImportError: x"}]}
    # seed 0: (50 - 45) / (50 - 40) = 50%; seed 1: (60 - 57) / (60 - 40) = 15%; a naive pooling would differ
    table = bp.seed_summary([run(0, 50.0, 45.0), run(1, 60.0, 57.0)])
    assert "| m | w2a4g64 | gptqmodel-matched | 2 | 51.00 ± 8.49 | 200.0 ± 0.0 | 32.5 ± 24.7 |" in table
    assert "| m | w2a4g64 | eacmoe-gptq | 2 | 55.00 ± 7.07 | 100.0 ± 0.0 | 0.0 ± 0.0 |" in table
    assert "llmcompressor" not in table
    with pytest.raises(SystemExit, match="nsamples"):
        bp.seed_summary([run(0, 50.0, 45.0), {**run(1, 60.0, 57.0), "meta": {**meta, "seed": 1, "nsamples": 16}}])
    with pytest.raises(SystemExit, match="its own seed"):
        bp.seed_summary([run(0, 50.0, 45.0), run(0, 60.0, 57.0)])


def test_the_papers_two_and_a_half_schedule_reaches_eacmoe_and_gptqmodel_as_the_same_widths(bp, tmp_path):
    from eacmoe.quantize import build_parser
    from eacmoe.schedule import parse_expert_bits

    scheme = bp.parse_scheme("w2.5a4g128")
    assert (scheme.bits, scheme.attention_bits, scheme.paper_schedule, scheme.expert_bits) == (2, 4, True, "2.5")
    with pytest.raises(argparse.ArgumentTypeError, match="attention width"):
        bp.parse_scheme("w2.5g128")
    job = bp.Job(model="m", model_dir=str(tmp_path), scheme=scheme, calib_file="c", out_dir="o", threads=1,
                 nsamples=4, seqlen=8, calib="bundled", seed=0, damp_percent=0.01, llmc_python="p")
    assert build_parser().parse_args(bp.METHODS["eacmoe-gptq"].command(job)[3:]).bits == "2.5"
    worker = bp.build_parser().parse_args(bp.METHODS["gptqmodel-matched"].command(job)[2:])
    assert worker.paper_schedule and (worker.bits, worker.attn_bits) == (2, 4)
    layer_bits = parse_expert_bits("2.5", 8)                      # eacmoe's widths: [3, 3, 3, 3, 2, 2, 2, 2]
    qcfg = _gptqmodel_config(bits=2, group_size=128, dynamic=bp.gptqmodel_dynamic(4, layer_bits, 2))
    for layer, width in enumerate(layer_bits):                    # GPTQModel's own matching of the overrides
        assert (qcfg.dynamic_get(f"model.layers.{layer}.mlp.experts.5.up_proj", "bits") or 2) == width
        assert (qcfg.dynamic_get(f"model.layers.{layer}.mlp.shared_expert.down_proj", "bits") or 2) == width
        assert qcfg.dynamic_get(f"model.layers.{layer}.self_attn.k_proj", "bits") == 4
    assert qcfg.dynamic_get("model.layers.13.mlp.experts.0.up_proj", "bits") is None  # not layer 1 or 3
