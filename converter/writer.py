"""Atomic file writes: a conversion either replaces its outputs whole or leaves them alone."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _write_temp(path: Path, text: str) -> Path:
    """The text in a temp file beside `path` (same filesystem, so os.replace is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step; on any failure `path` is untouched."""
    write_files({path: text})


def write_files(files: dict[Path, str]) -> None:
    """Write every file to a temp first; only when all temps exist, move them into place.

    A failure while writing leaves every target as it was and no temp behind.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            temps.append((_write_temp(path, text), path))
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in temps:
        os.replace(tmp, path)
