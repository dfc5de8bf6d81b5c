"""Held-out token windows for the quick evaluation of a quantization run (perplexity, KL, expert shift).

`bundled-test`: the test split of the bundled corpus (documents in file order, joined with eos);
`bundled-test:<domain>`: the same, one domain only (sotu, brown, shakespeare, pydoc);
`wikitext2`: WikiText-2 test, lines joined as GPTQ's evaluation does (local copy offline, the hub online).
The windows are spread evenly over the whole text, so every domain is represented.
"""
from __future__ import annotations

import logging

import torch

from .corpus import iter_documents, wikitext2_dir

log = logging.getLogger(__name__)


def _wikitext2_test_text() -> str | None:
    local = wikitext2_dir()
    if local is not None:
        return (local / "test.txt").read_text(encoding="utf-8")
    try:
        from datasets import load_dataset

        return "".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
    except Exception as exc:  # offline and no local copy
        log.info("WikiText-2 test unavailable: %s", exc)
        return None


def heldout_sequences(source: str, tokenizer, nsamples: int, seqlen: int) -> torch.Tensor | None:
    """[nsamples, seqlen] token windows of `source`, or None when the source cannot be read here."""
    if source == "bundled-test" or source.startswith("bundled-test:"):
        eos = tokenizer.eos_token or ""
        domains = (source.partition(":")[2],) if ":" in source else None
        text = eos.join(d["text"] for d in iter_documents("test", domains))
        if not text:
            raise ValueError(f"no test documents for {source!r}")
    elif source == "wikitext2":
        text = _wikitext2_test_text()
        if text is None:
            return None
    else:
        raise ValueError(f"unknown held-out source {source!r}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    windows = ids.numel() // seqlen
    if windows < nsamples:
        raise ValueError(f"{source} holds only {windows} windows of {seqlen} tokens; asked for {nsamples}")
    picks = torch.linspace(0, windows - 1, nsamples).round().long()
    return ids[: windows * seqlen].view(windows, seqlen)[picks]
