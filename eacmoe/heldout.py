"""Held-out token windows for the quick evaluation of a quantization run (perplexity, KL, expert shift).

`bundled-test`: the test split of the bundled corpus (documents in file order, joined with eos);
`bundled-test:<domain>`: the same, one domain only (sotu, brown, shakespeare, pydoc);
`wikitext2`: WikiText-2 test, lines joined as GPTQ's evaluation does (the local copy when there is one, else
the hub, or the datasets cache in offline mode; skipped with one log line when none of them has it).
The windows are spread evenly over the whole text, so every domain is represented. The text is tokenized whole
and then cut into windows, so the tokenizer's "longer than the maximum sequence length" warning is beside the
point and silenced.
"""
from __future__ import annotations

import logging

import torch

from .corpus import iter_documents, wikitext2_dir
from .hub import hub_reachable, offline_mode_requested

log = logging.getLogger(__name__)


def _wikitext2_test_text() -> str | None:
    local = wikitext2_dir()
    if local is not None:
        return (local / "test.txt").read_text(encoding="utf-8")
    missing = "held-out source wikitext2 skipped: no local copy (set EACMOE_WIKITEXT2_DIR to a folder with test.txt)"
    if not (offline_mode_requested() or hub_reachable()):  # in offline mode datasets may still have it cached
        log.info("%s and the Hugging Face hub is unreachable", missing)
        return None
    try:
        from datasets import load_dataset

        return "".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
    except Exception as exc:  # offline without a cached copy, or the hub refused
        log.info("%s and the hub did not give it (%s)", missing, exc)
        return None


def heldout_sequences(source: str, tokenizer, nsamples: int, seqlen: int) -> torch.Tensor | None:
    """[nsamples, seqlen] token windows of `source`, or None (logged) when the source cannot be read here."""
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
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    windows = ids.numel() // seqlen
    if windows < nsamples:
        raise ValueError(f"{source} holds only {windows} windows of {seqlen} tokens; asked for {nsamples}")
    picks = torch.linspace(0, windows - 1, nsamples).round().long()
    return ids[: windows * seqlen].view(windows, seqlen)[picks]
