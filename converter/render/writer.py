"""Atomic file writes: a conversion either replaces its outputs whole or leaves them alone."""

from __future__ import annotations

import os
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from converter.errors import ConversionError


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(path: Path) -> int:
    """The mode a plain `open(path, "w")` would leave: the existing file's permission
    bits, else 0o666 less the umask (mkstemp's own 0o600 is only for the temp's name)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def _write_temp(path: Path, text: str) -> Path:
    """The text in a temp file beside `path` (same filesystem, so os.replace is atomic),
    with the mode `path` gets from a normal write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, file_mode(path))
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

    A failure while writing leaves every target whole (old or new text) and no temp
    behind. Ctrl-C while writing waits until the batch is in place (milliseconds), so an
    interrupted `convert --all` never leaves half of a batch's replacements done.
    """
    with sigint_deferred():
        temps: list[tuple[Path, Path]] = []
        try:
            for path, text in files.items():
                temps.append((_write_temp(path, text), path))
            while temps:
                tmp, path = temps[0]
                os.replace(tmp, path)
                temps.pop(0)
        except BaseException:
            for tmp, _ in temps:
                tmp.unlink(missing_ok=True)
            raise


def check_writable_dir(out_dir: Path) -> None:
    """Fail before converting anything when `out_dir` cannot receive files."""
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # a missing output directory is created: its parent must do
    if not probe.is_dir():
        raise ConversionError(
            f"{probe} is not a directory",
            path=out_dir,
            hint="pass --out a directory (it is created if missing)",
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConversionError(
            f"output directory {probe} is not writable",
            path=out_dir,
            hint="pass --out a writable directory or fix its permissions",
        )


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold SIGINT until the block ends, then deliver it (as KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)
