"""Generated headers name the source as `models/<type>/modeling_<type>.py` wherever
transformers is installed, also when its directory is reached through a symlink (a
symlinked virtual environment made `hf2paged check` flag all 73 modules)."""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

from converter.hf import resolve


def test_display_path_is_stable_through_a_symlinked_install(tmp_path, monkeypatch) -> None:
    real = resolve.transformers_root()
    source = real / "models" / "llama" / "modeling_llama.py"
    assert resolve.display_path(source) == "models/llama/modeling_llama.py"
    link = tmp_path / "linked-site-packages"
    link.symlink_to(real.parent, target_is_directory=True)
    linked_root = link / real.name
    spec = importlib.machinery.ModuleSpec("transformers", None, is_package=True)
    spec.submodule_search_locations = [str(linked_root)]  # what a linked venv reports
    monkeypatch.setattr(resolve.importlib.util, "find_spec", lambda name: spec)
    resolve.transformers_root.cache_clear()
    try:
        for path in (source, linked_root / "models" / "llama" / "modeling_llama.py"):
            assert resolve.display_path(path) == "models/llama/modeling_llama.py"
    finally:
        monkeypatch.undo()
        resolve.transformers_root.cache_clear()
    assert resolve.display_path(Path("/elsewhere/modeling_mine.py")) == "modeling_mine.py"
