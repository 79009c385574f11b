"""The per-user cache: `$XDG_CACHE_HOME/hf2paged` (default `~/.cache/hf2paged`).

It holds what hf2paged builds once on a user's behalf: GGUF files converted to model
directories (`gguf_cache.py`) and the generated modules of model directories that carry
their own code (`remote_code.py`, under `modules/`). Every entry is a directory built in
a temp directory beside it and renamed into place, so an entry either does not exist or
is complete; a failure (or Ctrl-C) removes its temp directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from converter.render.writer import current_umask

# Temp dirs older than this are leftovers of a killed build, not one in progress.
STALE_TMP_SECONDS = 3600


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/hf2paged`, or `~/.cache/hf2paged`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hf2paged"


def build_once(final: Path, marker: str, build: Callable[[Path], None]) -> float | None:
    """Make sure `final` exists (complete when it holds `marker`): `build(tmp)` fills a
    temp directory beside it, which is then renamed to `final`. Returns the seconds the
    build took, or None when `final` was already there. Directories get the modes a
    plain `mkdir` would (the umask), not mkdtemp's 0o700."""
    if (final / marker).exists():
        return None
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_tmp_dirs(final)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same build first: keep its copy.
            if not (final / marker).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return time.perf_counter() - start


def sweep_stale_tmp_dirs(final: Path) -> None:
    """Remove temp directories of `final` left by builds killed long ago."""
    now = time.time()
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            pass
