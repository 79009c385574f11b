"""No lost or half-written work: atomic writes, Ctrl-C during `convert --all` (exit 130,
one line, nothing written, no temp files), and a batch that converts every good
architecture and reports every failure at the end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from cli_helpers import GENERATED, one_error_line, run_cli, snapshot

import converter.convert
import converter.render.writer
from converter.convert import architectures
from converter.render import REPO_ROOT
from converter.render.writer import write_files


def _seeded_out(tmp_path):
    """An output directory holding a copy of generated/ (the files a run could clobber)."""
    out = tmp_path / "out"
    shutil.copytree(GENERATED, out, ignore=shutil.ignore_patterns("__pycache__"))
    return out


def test_failed_replace_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    a, b, c = (tmp_path / n for n in ("a.py", "b.py", "c.py"))
    a.write_text("old a")
    b.write_text("old b")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("device went away")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="device went away"):
        write_files({a: "new a", b: "new b", c: "new c"})
    # a was already in place; b (the failed replace) and c are as they were
    assert (a.read_text(), b.read_text(), c.exists()) == ("new a", "old b", False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.py", "b.py"]


def test_sigint_while_writing_waits_for_the_batch(tmp_path, monkeypatch):
    files = {tmp_path / f"m{i}.py": f"new {i}" for i in range(3)}
    for path in files:
        path.write_text("old")
    real_write_temp = converter.render.writer._write_temp

    def write_temp(path, text):
        if path.name == "m0.py":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C before any file is in place
        return real_write_temp(path, text)

    monkeypatch.setattr(converter.render.writer, "_write_temp", write_temp)
    with pytest.raises(KeyboardInterrupt):
        write_files(files)
    assert all(path.read_text() == text for path, text in files.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.py", "m1.py", "m2.py"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_conversion_writes_nothing(tmp_path, monkeypatch):
    out = _seeded_out(tmp_path)
    before = snapshot(out)
    real_generate = converter.convert.generate
    seen = []

    def generate(target, *args, **kwargs):
        seen.append(target)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real_generate(target, *args, **kwargs)

    monkeypatch.setattr(converter.convert, "generate", generate)
    result = run_cli("convert", "--all", "--out", out)
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    last = result.stderr.splitlines()[-1]
    assert last == (
        f"error: interrupted while converting {seen[2]} (2 of {len(architectures())} "
        "converted): nothing written"
    )
    assert snapshot(out) == before


def test_ctrl_c_while_writing_finishes_the_batch(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_write_temp = converter.render.writer._write_temp
    fired = []

    def write_temp(path, text):
        if not fired:
            fired.append(path)
            os.kill(os.getpid(), signal.SIGINT)
        return real_write_temp(path, text)

    monkeypatch.setattr(converter.render.writer, "_write_temp", write_temp)
    result = run_cli("convert", "llama", "opt", "--out", out)
    assert result.exit_code == 130 and "Traceback" not in result.output, result.output
    assert result.stderr.splitlines()[-1].startswith(
        f"error: interrupted while writing {out}: every file there is whole"
    )
    assert sorted(p.name for p in out.iterdir()) == ["__init__.py", "llama.py", "opt.py"]
    assert "class LlamaForCausalLM" in (out / "llama.py").read_text()


def test_real_sigint_during_convert_all(tmp_path):
    """A real Ctrl-C (SIGINT) to the CLI process once the first architecture is done."""
    out = _seeded_out(tmp_path)
    before = snapshot(out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hf2paged.cli", "convert", "--all", "--out", str(out)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stderr.readline()
        assert first.startswith("converted "), first
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    lines = [first, *rest.splitlines()]
    # 130 is what the CLI exits with after its own message. Once, on a loaded CI machine, the
    # process printed that same message and then ended by the signal itself (-SIGINT, no
    # traceback): a shell reports both as 130, the Ctrl-C convention. What matters is checked
    # below: our one line, no traceback, nothing written.
    assert code in (130, -signal.SIGINT), lines
    assert "Traceback" not in rest
    assert lines[-1].startswith("error: interrupted while converting ")
    assert lines[-1].endswith("converted): nothing written")
    assert snapshot(out) == before  # no file changed, no temp file left


def test_all_with_one_broken_source_converts_the_rest(tmp_path):
    broken = tmp_path / "src" / "modeling_broken.py"
    broken.parent.mkdir()
    broken.write_text("import torch\n\n\ndef f(:\n    pass\n")
    out = tmp_path / "out"
    before = snapshot(GENERATED)
    result = run_cli("convert", "llama", str(broken), "opt", "--out", out)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    err = result.stderr.splitlines()
    assert err[-2].startswith("2 converted, 1 failed in ")
    assert err[-1].startswith(f"error: {broken}:4: not valid Python")
    assert sorted(p.name for p in out.iterdir()) == ["__init__.py", "llama.py", "opt.py"]
    registry = (out / "__init__.py").read_text()
    assert '"LlamaForCausalLM"' in registry and '"OPTForCausalLM"' in registry
    assert snapshot(GENERATED) == before


def test_every_failure_is_reported_at_the_end(tmp_path):
    bad = tmp_path / "modeling_bad.py"
    bad.write_text("x = (\n")
    line_errors = run_cli("convert", "nosuchmodel", str(bad), "mamba", "--out", tmp_path / "o")
    assert line_errors.exit_code == 2
    errors = [line for line in line_errors.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, line_errors.stderr  # in the order given, after the summary
    assert errors[0].startswith("error: nosuchmodel: unknown model type")
    assert errors[1].startswith(f"error: {bad}:1: not valid Python")
    assert "modeling_mamba.py" in errors[2] and "no attention class" in errors[2]
    assert line_errors.stderr.splitlines()[-4].startswith("0 converted, 3 failed")
    assert not (tmp_path / "o").exists()
    # a single failing target prints its one line and nothing else
    one_error_line(run_cli("convert", "nosuchmodel", "--out", tmp_path / "o"))
