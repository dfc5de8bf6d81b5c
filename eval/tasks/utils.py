"""Run-time helpers for the eacmoe lm-eval tasks (referenced from the YAML files with ``!function utils.X``).

Why a ``custom_dataset`` loader instead of plain ``dataset_path: json``: lm-eval hands ``data_files`` to
``datasets.load_dataset`` unchanged, and a relative path there is resolved against the CURRENT WORKING
DIRECTORY, not the YAML file. ``load_local_json`` resolves it against this directory, so the suite runs from
any cwd, and it builds the dataset in memory (no Arrow cache under ~/.cache, nothing to download).
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import datasets

log = logging.getLogger("eacmoe.eval.tasks")

TASKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TASKS_DIR.parents[1]


def load_local_json(data_files: dict[str, str] | None = None, **_metadata: Any) -> datasets.DatasetDict:
    """Load the committed JSONL item files named in ``dataset_kwargs.data_files`` (paths relative to this dir).

    lm-eval calls a ``custom_dataset`` with the task metadata (version, model args, ...) plus
    ``dataset_kwargs``; everything but ``data_files`` is ignored.
    """
    if not data_files:
        raise ValueError("load_local_json needs dataset_kwargs.data_files, e.g. {test: data/cloze.jsonl}")
    splits = {}
    for split, rel_path in data_files.items():
        path = Path(rel_path) if Path(rel_path).is_absolute() else TASKS_DIR / rel_path
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; regenerate the items with `python eval/build_tasks.py`")
        with path.open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        splits[split] = datasets.Dataset.from_list(records)
    return datasets.DatasetDict(splits)


# --------------------------------------------------------------------------------------------- WikiText-2
def _wikitext2_dir() -> Path | None:
    """eacmoe.corpus.wikitext2_dir(), importing eacmoe from this checkout if it is not installed."""
    try:
        from eacmoe.corpus import wikitext2_dir
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        from eacmoe.corpus import wikitext2_dir
    return wikitext2_dir()


def split_wikitext_documents(text: str) -> list[str]:
    """Document-level split of WikiText: a new document starts at each level-1 heading line ' = Title = '.

    Same rule as the EleutherAI/wikitext_document_level dataset that lm-eval's ``wikitext`` task uses
    (the WikiText-2 test split gives 62 documents).
    """
    pages, current = [], []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return pages


def load_wikitext2(**_metadata: Any) -> datasets.DatasetDict:
    """The WikiText-2 test split as documents {"page": ...}, read at run time from the shared copy.

    The file is found by ``eacmoe.corpus.wikitext2_dir()``: ``$EACMOE_WIKITEXT2_DIR/test.txt``, else
    ``shared/data/wikitext-2/test.txt`` in one of the directories above the eacmoe package. It is never copied
    into the repository.
    """
    directory = _wikitext2_dir()
    if directory is None:
        raise FileNotFoundError(
            "WikiText-2 test file not found: set EACMOE_WIKITEXT2_DIR to a directory containing test.txt, or place "
            "it at shared/data/wikitext-2/test.txt beside the checkout. Without it, run the other tasks "
            "(--tasks eacmoe_ppl,eacmoe_cloze,eacmoe_nextsent)."
        )
    path = directory / "test.txt"
    log.info("eacmoe_wikitext2: reading %s", path)
    pages = split_wikitext_documents(path.read_text(encoding="utf-8"))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"page": page} for page in pages])})


def wikitext_detokenizer(doc: dict) -> str:
    """lm-eval's own WikiText detokenizer (so the scored text matches its ``wikitext`` task)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer as detokenize

    return detokenize(doc)


def wikitext_process_results(doc: dict, results: list[float]) -> dict[str, tuple[float, int]]:
    """Perplexity terms; words and bytes are counted on the ORIGINAL (tokenised) page, as lm-eval does."""
    (loglikelihood,) = results
    n_words = len(re.split(r"\s+", doc["page"]))
    n_bytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, n_words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
