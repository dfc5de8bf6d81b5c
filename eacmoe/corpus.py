"""Read the bundled corpus (built by calibration/build_corpus.py) and WikiText-2 text."""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .assets import CORPUS_DIR

SPLITS = ("train", "validation", "test")
DOMAINS = ("sotu", "brown", "shakespeare", "pydoc")


def iter_documents(split: str, domains: tuple[str, ...] | None = None) -> Iterator[dict]:
    """Yield the records {id, domain, split, text[, genre]} of one split of the bundled corpus."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    with gzip.open(CORPUS_DIR / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if domains is None or rec["domain"] in domains:
                yield rec


def wikitext2_dir() -> Path | None:
    """The offline WikiText-2 copy: $EACMOE_WIKITEXT2_DIR, else ../shared/data/wikitext-2 next to the checkout."""
    candidates = []
    if os.environ.get("EACMOE_WIKITEXT2_DIR"):
        candidates.append(Path(os.environ["EACMOE_WIKITEXT2_DIR"]))
    here = Path(__file__).resolve()
    candidates += [p / "shared" / "data" / "wikitext-2" for p in here.parents[:4]]
    for c in candidates:
        if (c / "test.txt").exists():
            return c
    return None
