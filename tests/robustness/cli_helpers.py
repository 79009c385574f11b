"""Shared by the robustness tests: run the CLI in-process, snapshot a directory's bytes,
and check the one-line error contract (exit 2, one `error:` line, no traceback)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from typer.testing import CliRunner

from converter.hf.resolve import modeling_file
from converter.render import REPO_ROOT
from hf2paged.cli import app

GENERATED = REPO_ROOT / "generated"


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def snapshot(directory: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory` (hidden temps included)."""
    if not directory.exists():
        return {}
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def one_error_line(result, code: int = 2) -> str:
    """The single stderr line of a failed command (asserting the contract)."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def source_of(model_type: str) -> str:
    return modeling_file(model_type).read_text(encoding="utf-8")


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the source changed: {old!r} found {text.count(old)} times"
    return text.replace(old, new)
