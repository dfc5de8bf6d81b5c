"""Unigram baseline for the eacmoe suite: a context-free LM over the bundled tokenizer's tokens.

The model is fitted on the TRAIN split of the bundled corpus (each document tokenized, plus one eos per
document, as in scripts/train_tiny_moe.py) with add-alpha smoothing, ``p(t) = (count(t) + alpha) /
(N + alpha * V)``, and scored on the very same tasks through lm-eval's own request and metric code:
``UnigramLM`` implements ``lm_eval.api.model.LM`` and is passed to ``lm_eval.simple_evaluate``. Text is split
into tokens exactly as lm-eval's HF backend does (same tokenizer, no special tokens, the same context /
continuation boundary), so token counts match those of a model evaluated with the bundled tokenizer.

    python eval/unigram_baseline.py --out eval/results/unigram.json [--limit 20]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
if str(REPO_ROOT) not in sys.path:  # running as a script from a checkout without an installed eacmoe
    sys.path.insert(0, str(REPO_ROOT))

from lm_eval.api.model import LM  # noqa: E402

log = logging.getLogger("eacmoe.eval.unigram")

SUITE = "eacmoe_suite"


def fit_unigram_counts(tokenizer, split: str = "train", batch_docs: int = 64) -> np.ndarray:
    """Token counts (int64, one per vocabulary id) over one split of the bundled corpus, one eos per document."""
    from eacmoe.corpus import iter_documents

    counts = np.zeros(len(tokenizer), dtype=np.int64)
    batch: list[str] = []
    n_docs = 0

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            counts[:] += np.bincount(np.asarray(ids, dtype=np.int64), minlength=len(counts))
        batch.clear()

    for doc in iter_documents(split):
        batch.append(doc["text"])
        n_docs += 1
        if len(batch) >= batch_docs:
            flush()
    if batch:
        flush()
    counts[tokenizer.eos_token_id] += n_docs
    log.info("unigram counts: %d documents, %d tokens (%s split)", n_docs, int(counts.sum()), split)
    return counts


class UnigramLM(LM):
    """A context-free language model: log p(continuation | context) = sum of log p(token)."""

    def __init__(self, tokenizer, counts: np.ndarray, alpha: float = 1.0) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.alpha = alpha
        smoothed = counts.astype(np.float64) + alpha
        self.log_probs = np.log(smoothed / smoothed.sum())
        self.greedy_token = int(np.argmax(self.log_probs))

    @classmethod
    def from_bundled(cls, alpha: float = 1.0) -> "UnigramLM":
        """Fit on the bundled corpus's train split with the bundled tokenizer."""
        from transformers import AutoTokenizer

        from eacmoe.assets import TOKENIZER_DIR

        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        return cls(tokenizer, fit_unigram_counts(tokenizer), alpha=alpha)

    # The same string -> token split as lm_eval.models.huggingface.HFLM (causal, no special tokens).
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _continuation_tokens(self, context: str, continuation: str) -> list[int]:
        if not context:
            return self._encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:  # HFLM moves trailing context whitespace into the continuation
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation)
        return whole[len(self._encode(context)) :]

    def _score(self, token_ids: Sequence[int]) -> float:
        return float(self.log_probs[np.asarray(token_ids, dtype=np.int64)].sum()) if len(token_ids) else 0.0

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args
            tokens = self._continuation_tokens(context, continuation)
            results.append((self._score(tokens), all(t == self.greedy_token for t in tokens)))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [self._score(self._encode(request.args[0])) for request in requests]

    def generate_until(self, requests) -> list[str]:
        raise NotImplementedError("the unigram baseline only scores text; generation tasks are not supported")


def run_unigram_suite(
    tasks: Sequence[str] = (SUITE,), limit: float | None = None, alpha: float = 1.0, lm: UnigramLM | None = None
) -> dict[str, Any]:
    """Evaluate the unigram baseline on eacmoe tasks with ``lm_eval.simple_evaluate``; returns its results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = lm or UnigramLM.from_bundled(alpha=alpha)
    start = time.perf_counter()
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
        limit=limit,
        log_samples=False,
    )
    results["total_evaluation_time_seconds"] = str(time.perf_counter() - start)
    results["config"]["model"] = f"unigram (add-{alpha:g}, bundled tokenizer, train split)"
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=SUITE, help="comma-separated task or group names (default: the suite)")
    parser.add_argument("--limit", type=float, default=None, help="items per task (testing only)")
    parser.add_argument("--alpha", type=float, default=1.0, help="add-alpha smoothing constant")
    parser.add_argument("--out", type=Path, default=None, help="write the lm-eval results JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from lm_eval.utils import handle_non_serializable, make_table

    results = run_unigram_suite(args.tasks.split(","), limit=args.limit, alpha=args.alpha)
    print(make_table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=handle_non_serializable) + "\n")
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
