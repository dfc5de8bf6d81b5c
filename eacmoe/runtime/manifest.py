"""Integrity manifest of an exported checkpoint: every weight file's size and SHA-256.

A truncated download, a partial copy or an edited tensor file then fails on load with a message that names the
file, instead of loading garbage. Sizes are always checked; hashing (seconds per GB) can be skipped with
``EACMOE_SKIP_CHECKSUM=1`` for files already verified once.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_NAME = "eacmoe_manifest.json"
_CHUNK = 16 * 1024 * 1024


class CheckpointIntegrityError(OSError):
    """A weight file of an exported checkpoint is missing, truncated or altered."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, files: list[str]) -> dict:
    """Record size and SHA-256 of ``files`` (names relative to ``directory``) in ``directory/MANIFEST_NAME``."""
    directory = Path(directory)
    entries = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
               for name in sorted(files)}
    manifest = {"format": "eacmoe-manifest-v1", "files": entries}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def verify_manifest(directory: Path) -> list[str]:
    """Check every file of the manifest; returns their names. Raises CheckpointIntegrityError on any mismatch."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointIntegrityError(f"{directory} has no {MANIFEST_NAME}: not a complete eacmoe export")
    files = json.loads(path.read_text())["files"]
    check_hash = os.environ.get("EACMOE_SKIP_CHECKSUM", "") not in ("1", "true", "yes")
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointIntegrityError(f"{file} is missing (listed in {MANIFEST_NAME})")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointIntegrityError(
                f"{file} has {size} bytes, the manifest says {entry['bytes']}: the file is truncated or altered; "
                "copy or download it again")
        if check_hash and sha256_file(file) != entry["sha256"]:
            raise CheckpointIntegrityError(
                f"{file} does not match its SHA-256 in {MANIFEST_NAME}: the file was altered or corrupted; "
                "copy or download it again")
    return list(files)
