"""Calibration data: `n` sequences of `seqlen` tokens, seeded, from one of several text sources.

Sources:
  bundled     the train split of eacmoe's bundled corpus (default; always offline)
  wikitext2   WikiText-2: `datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")` when the hub
              is reachable; offline, the validation split of the local copy (see eacmoe.corpus.wikitext2_dir)
  c4          allenai/c4 (English, first training shard); needs the network
  PATH        a local .txt file (one document per blank-line-separated block) or .jsonl file (field "text")

Documents are shuffled with the seed, joined with the tokenizer's eos token and cut into consecutive
windows, so the windows never overlap and the same seed always gives the same tokens.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable
from pathlib import Path

import torch

from .corpus import iter_documents, wikitext2_dir
from .hub import hub_reachable

log = logging.getLogger(__name__)

SOURCES = ("bundled", "wikitext2", "c4")


class CalibrationDataError(ValueError):
    """The calibration source cannot be read or holds too little text."""


def _wikitext2_documents(split: str) -> list[str]:
    """WikiText-2 split as documents (a document starts at a ` = Title = ` heading line)."""
    docs: list[str] = []
    if hub_reachable():  # offline mode or no network: straight to the local copy, no retries
        try:
            from datasets import load_dataset

            lines = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
        except Exception as exc:  # no network: fall back to the local copy below
            log.info("wikitext2 from the hub failed (%s); using the local copy", type(exc).__name__)
            lines = None
    else:
        lines = None
    if lines is None:
        local = wikitext2_dir()
        if local is None:
            raise CalibrationDataError("wikitext2 is not reachable offline: set EACMOE_WIKITEXT2_DIR to a folder with valid.txt")
        if split == "train":
            log.warning("offline: WikiText-2 train is not available locally; calibrating on its validation split")
            split = "valid"
        lines = (local / f"{'valid' if split == 'validation' else split}.txt").read_text(encoding="utf-8").splitlines(True)
    current: list[str] = []
    for line in lines:
        if line.startswith(" = ") and not line.startswith(" = = ") and current:
            docs.append("".join(current).strip())
            current = []
        current.append(line)
    if current:
        docs.append("".join(current).strip())
    return [d for d in docs if d]


def _c4_documents() -> Iterable[str]:
    if not hub_reachable():
        raise CalibrationDataError("c4 needs the network (offline mode is set or the Hugging Face hub is unreachable); "
                                   "use --calib bundled, wikitext2 or a local file")
    try:
        from datasets import load_dataset

        ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    except Exception as exc:
        raise CalibrationDataError(f"c4 could not be loaded from the hub ({type(exc).__name__}: {exc})") from exc
    return ds["text"]


def _file_documents(path: Path) -> list[str]:
    if not path.exists():
        raise CalibrationDataError(f"calibration file {path} does not exist")
    if not path.is_file():
        raise CalibrationDataError(f"--calib {path} is a directory; give a .txt or .jsonl file")
    if path.suffix not in (".txt", ".jsonl"):
        raise CalibrationDataError(f"calibration file {path} must be .txt or .jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(f"calibration file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                                   f"offset {exc.start}); convert it, e.g. iconv -f latin1 -t utf-8") from exc
    except OSError as exc:
        raise CalibrationDataError(f"cannot read calibration file {path}: {exc.strerror}") from exc
    if path.suffix == ".jsonl":
        try:
            docs = [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CalibrationDataError(f"{path}: every line must be a JSON object with a 'text' field") from exc
        if not all(isinstance(d, str) for d in docs):
            raise CalibrationDataError(f"{path}: every 'text' field must be a string")
        return docs
    return [block for block in text.split("\n\n") if block.strip()]


def load_documents(source: str) -> list[str]:
    """The documents of a calibration source (a name in SOURCES or a local file path)."""
    if source == "bundled":
        return [d["text"] for d in iter_documents("train")]
    if source == "wikitext2":
        return _wikitext2_documents("train")
    if source == "c4":
        return list(_c4_documents())
    if os.sep in source or source.endswith((".txt", ".jsonl")) or Path(source).exists():
        return _file_documents(Path(source))
    raise CalibrationDataError(f"unknown calibration source {source!r}; use one of {', '.join(SOURCES)} or a .txt/.jsonl path")


def get_calibration_data(source: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Token ids [nsamples, seqlen] drawn from `source` (see module docstring), deterministic in `seed`."""
    if nsamples < 1 or seqlen < 2:
        raise CalibrationDataError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    docs = load_documents(source)
    random.Random(seed).shuffle(docs)
    needed = nsamples * seqlen
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        # verbose=False: a document longer than the model's context is cut into windows below, on purpose
        stream.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise CalibrationDataError(
            f"calibration source {source!r} has only {len(stream)} tokens; {nsamples} x {seqlen} = {needed} are needed")
    return torch.tensor(stream[:needed], dtype=torch.long).view(nsamples, seqlen)
