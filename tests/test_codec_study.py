"""The codec study of a sweep's report (eacmoe.codec_study): which bounds it times, what it measures, its reuse."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from eacmoe import codec_study
from eacmoe.codecs import get_codec, mean_abs, parse_bound

pytest.importorskip("pysz")
pytest.importorskip("zfpy")


def _row(cell, method, target, bpw, searched=None):
    row = {"cell": cell, "method": method, "target": target, "bits": {"bits_per_weight": bpw}}
    if searched:
        row["searched_bound"] = searched
    return row


def test_codec_bounds_time_the_bound_each_codec_cell_used():
    rows = [_row("fp", "fp", None, 16.0), _row("gptq@2", "gptq", "2", 2.27),
            _row("sz3@bpw:3", "sz3", "bpw:3", 3.0, "rel:0.2"), _row("sz3@bpw:2", "sz3", "bpw:2", 2.0, "rel:0.6"),
            _row("zfp@rel:0.3", "zfp", "rel:0.3", 2.9), _row("sz3@abs:1e-3", "sz3", "abs:1e-3", 4.5)]
    assert codec_study.codec_bounds(rows, ["sz3", "zfp"]) == [
        ("sz3", "sz3@bpw:2", "rel:0.6"), ("sz3", "sz3@bpw:3", "rel:0.2"), ("sz3", "sz3@abs:1e-3", "abs:1e-3"),
        ("zfp", "zfp@rel:0.3", "rel:0.3")]
    assert codec_study.codec_bounds(rows, []) == []


@pytest.fixture
def matrices():
    rng = np.random.default_rng(0)
    return {f"layers.{i}.mlp.experts.{e}.w1": (rng.standard_normal((48, 64)) * 0.02 * (1 + e)).astype(np.float32)
            for i in range(3) for e in range(2)}


def test_study_measures_every_bound_at_one_and_all_workers_and_the_error_shape(matrices, tmp_path, monkeypatch):
    bounds = [("sz3", "sz3@bpw:2", "rel:0.6"), ("zfp", "zfp@rel:0.3", "rel:0.3")]
    study = codec_study.run_codec_study(matrices, bounds, tmp_path, "f00d", all_threads=2)
    numel = sum(m.size for m in matrices.values())
    assert [(r["cell"], r["threads"]) for r in study["throughput"]] == [
        ("sz3@bpw:2", 1), ("sz3@bpw:2", 2), ("zfp@rel:0.3", 1), ("zfp@rel:0.3", 2)]
    for r in study["throughput"]:
        assert r["numel"] == numel and r["compress_mb_s"] > 0 and r["decompress_mb_s"] > 0
        # the bytes timed are the bytes the sweep's cells count: the codec's own accounting of the same bound
        codec = get_codec(r["codec"])
        bits = sum(codec.compress(m, parse_bound(r["bound"])).bits.total_bits for m in matrices.values())
        assert r["bits_per_weight"] == pytest.approx(bits / numel, rel=1e-12)
    h = study["histogram"]
    assert h["matrix"] == "layers.1.mlp.experts.0.w1"  # the middle layer's first expert matrix
    w = matrices[h["matrix"]]
    assert h["abs_bound"] == pytest.approx(0.3 * mean_abs(w))
    assert h["real_max_abs"] <= h["abs_bound"] and 0.45 < h["std_over_bound"] < 0.7  # uniform-like: 1/sqrt(3)
    assert (tmp_path / "sz3_error.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "codecs.json").read_text()) == json.loads(json.dumps(study))
    lines = "\n".join(codec_study.report_lines(study))
    assert "| sz3 | sz3@bpw:2 | rel:0.6 |" in lines and "![SZ3 error" in lines
    assert f"{1 / h['std_over_bound']:.2f}x that std" in lines

    # the same key: reused without timing again; other bounds or worker counts: measured anew
    def no_timing(*_a, **_k):
        raise AssertionError("measured again")

    monkeypatch.setattr(codec_study, "measure_throughput", no_timing)
    (tmp_path / "sz3_error.png").unlink()
    assert codec_study.run_codec_study(matrices, bounds, tmp_path, "f00d", all_threads=2) == study
    assert (tmp_path / "sz3_error.png").exists()  # drawn again
    for args in ((bounds[:1], "f00d", 2), (bounds, "beef", 2), (bounds, "f00d", 3)):
        with pytest.raises(AssertionError, match="measured again"):
            codec_study.run_codec_study(matrices, args[0], tmp_path, args[1], all_threads=args[2])
    assert math.isfinite(study["throughput"][0]["compress_s"])
