"""Manifests and atomic writes: every artifact says what made it, and is never seen half-written.

A manifest records the resolved config, the data fingerprint, the base model, the versions of
the libraries that matter and the git commit of this checkout. Files are written to a
temporary name in the same folder and renamed into place, which is atomic on POSIX.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LIBRARIES = ("retrieval-lora", "torch", "transformers", "sentence-transformers", "peft", "bitsandbytes",
             "faiss-cpu", "datasets", "ranx")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose behaviour shapes our artifacts."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def build_manifest(kind: str, config: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A manifest dict: `kind`, the resolved `config`, library versions, git commit, time, extras."""
    return {
        "kind": kind,
        "config": config,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "libraries": library_versions(),
        **fields,
    }


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as pretty, key-sorted JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def replace_dir_atomic(staging: Path, target: Path) -> None:
    """Move the finished folder `staging` to `target`, replacing any previous `target`.

    A reader sees either the old folder or the new one: the old one is first renamed aside,
    the new one renamed in, then the old one deleted. `staging` must be on the same filesystem.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(target: Path) -> Path:
    """A fresh, empty temporary folder beside `target`, to build an artifact in before renaming."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
