"""The pipeline's first and last lines of defence: the input must be Python, and any
exception a pass did not anticipate becomes one `ConversionError` line.

A pass that meets an unsupported construct raises `ctx.error(...)` itself; `stage_errors`
only catches what slipped through (a KeyError, an AttributeError on an unexpected node)
and names the pass and the source line it was working on, so a user can report it and
a developer can find it without rerunning (HF2PAGED_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import libcst as cst

from converter.context import ConversionContext, first_line
from converter.errors import ConversionError, InternalConversionError

_STATEMENTS = (cst.BaseStatement, cst.BaseSmallStatement)


def check_python(source: str, path: str | Path) -> None:
    """Raise a one-line ConversionError unless `source` is Python this interpreter parses."""
    try:
        ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        text = (exc.text or "").strip() or None
        raise ConversionError(
            f"not valid Python: {exc.msg}",
            path=path,
            line=exc.lineno,
            construct=text,
            hint="fix the syntax (`python -m py_compile FILE` shows the same error)",
        ) from None
    except ValueError as exc:  # e.g. "source code string cannot contain null bytes"
        raise ConversionError(
            f"not Python source: {exc}", path=path, hint="pass a modeling_<type>.py file"
        ) from None
    except (RecursionError, MemoryError):
        # CPython cannot compile it either (e.g. a 10,000-term sum on one line)
        raise ConversionError(
            "nested too deeply for the Python parser",
            path=path,
            hint="split the deepest expression into several statements",
        ) from None


def _node_in_progress(
    tb: types.TracebackType | None, ctx: ConversionContext
) -> tuple[int | None, str | None]:
    """The statement in the innermost frame (a pass, or libcst visiting for it) that maps
    to a source line."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, _STATEMENTS):
                line = ctx.line_of(value)
                if line is None and isinstance(value, cst.ClassDef):
                    # an earlier pass may have rewritten its first line (e.g. its bases)
                    info = ctx.classes.get(value.name.value)
                    line = info.line if info is not None else None
                if line is not None:
                    return line, first_line(value)
    return None, None


def stage_name(stage: object) -> str:
    """`converter.passes.flatten` -> `flatten`."""
    module = getattr(stage, "__module__", "") or ""
    return module.rsplit(".", 1)[-1] or getattr(stage, "__name__", repr(stage))


@contextmanager
def stage_errors(ctx: ConversionContext, stage: str) -> Iterator[None]:
    """Turn an unanticipated exception inside `stage` into an InternalConversionError."""
    try:
        yield
    except ConversionError:
        raise
    except Exception as exc:  # noqa: BLE001 — the last line of defence, re-raised as one line
        line, construct = _node_in_progress(exc.__traceback__, ctx)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InternalConversionError(
            f"internal error in the {stage} stage: {type(exc).__name__}: {detail}"[:300],
            path=ctx.source_path,
            line=line,
            construct=construct,
            hint="this input is not supported yet; report it with the file "
            "(HF2PAGED_DEBUG=1 shows the traceback)",
        ) from exc


def read_source(path: Path) -> str:
    """The text of a modeling file, or one ConversionError line saying why it cannot be read."""
    try:
        data = path.read_bytes()
        # as Python reads source: a BOM or a coding cookie picks the encoding, else UTF-8
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        text = data.decode(encoding)
    except (UnicodeDecodeError, SyntaxError) as exc:
        reason = f"byte {exc.start}: {exc.reason}" if isinstance(exc, UnicodeDecodeError) else exc
        raise ConversionError(
            f"not a text file in its declared encoding ({reason})",
            path=path,
            hint="pass a modeling_<type>.py source file",
        ) from None
    except LookupError as exc:  # a coding cookie naming no codec
        raise ConversionError(
            f"unknown source encoding: {exc}", path=path, hint="save the file as UTF-8"
        ) from None
    except OSError as exc:
        raise ConversionError(
            f"cannot read: {exc.strerror or exc}",
            path=path,
            hint="check the path and its permissions",
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text


_GENERATED = re.compile(r"^# AUTO-GENERATED by hf2paged \S+ from transformers \S+ (\S+) \(sha256")


def check_not_generated(source: str, path: str | Path) -> None:
    """A generated module is not a modeling file: point at the source it came from."""
    match = _GENERATED.match(source)
    if match is None:
        return
    origin = match.group(1)  # models/<type>/modeling_<type>.py, or a file name
    parts = origin.split("/")
    target = parts[1] if len(parts) == 3 and parts[0] == "models" else origin
    raise ConversionError(
        f"this is hf2paged output (converted from {origin}), not a modeling file",
        path=path,
        line=1,
        hint=f"convert its source instead: `hf2paged convert {target}`",
    )
