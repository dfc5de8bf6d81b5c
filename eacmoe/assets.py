"""Where the bundled assets (corpus, tokenizer, tiny trained MoE models) live.

They ship inside the package (``eacmoe/assets``), so the same lookup works from a checkout and from an
installed wheel.
"""
from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CORPUS_DIR = ASSETS_DIR / "corpus"
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
MODELS_DIR = ASSETS_DIR / "models"
BUNDLED_MODELS = ("tiny-mixtral", "tiny-qwen-moe")
DEFAULT_MODEL = "tiny-mixtral"


def bundled_model_path(name: str) -> Path:
    """Directory of a bundled model; raises FileNotFoundError with the available names."""
    path = MODELS_DIR / name
    if name not in BUNDLED_MODELS or not (path / "config.json").exists():
        raise FileNotFoundError(f"no bundled model {name!r}; bundled models: {', '.join(BUNDLED_MODELS)}")
    return path


def resolve_model(name_or_path: str) -> str:
    """A bundled model name becomes its directory; anything else (local path, hub id) is returned unchanged."""
    if name_or_path in BUNDLED_MODELS:
        return str(bundled_model_path(name_or_path))
    return name_or_path
