"""Output directories that eacmoe owns, and the only ones it ever deletes.

Every directory a quantization run creates, `<out>.partial/` and (renamed from it) `<out>/`, holds a marker file
`.eacmoe-output` (a small JSON) written when the directory is created. `--overwrite`, and the restart of an
interrupted run, remove a directory only when it carries the marker: a directory a user made, or filled with
files of their own before pointing `--out` at it, is never deleted.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from . import __version__

MARKER_NAME = ".eacmoe-output"


def partial_dir(out: Path) -> Path:
    """Where the run writes until it is complete (renamed to `out` at the very end)."""
    return out.with_name(out.name + ".partial")


def mark(directory: Path) -> None:
    """Create `directory` (and its parents) if needed and claim it for eacmoe."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = {"tool": "eacmoe", "version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (directory / MARKER_NAME).write_text(json.dumps(marker) + "\n")


def is_marked(directory: Path) -> bool:
    """Whether `directory` is a directory that eacmoe created (it holds eacmoe's marker)."""
    try:
        return json.loads((directory / MARKER_NAME).read_text()).get("tool") == "eacmoe"
    except (OSError, ValueError, AttributeError):
        return False


def remove(directory: Path) -> None:
    """Delete a directory eacmoe created; anything else raises (callers check `is_marked` first)."""
    if not is_marked(directory):
        raise ValueError(f"{directory} was not created by eacmoe (no {MARKER_NAME}); not deleting it")
    shutil.rmtree(directory)
