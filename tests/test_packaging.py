"""`pip install .` (not editable) ships every package of the project's trees: the
package list comes from pyproject's find settings, and every directory holding Python
code under those trees is one of the packages they find (a hand-kept list once missed
converter.passes.moe, so a plain install could not import the converter)."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_namespace_packages

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_code_directory_is_a_shipped_package() -> None:
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    find = settings["packages"]["find"]
    found = set(
        find_namespace_packages(str(ROOT), include=find["include"], exclude=find["exclude"])
    )
    code_dirs = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for top in ("hf2paged", "converter", "runtime", "generated", "rules")
        for path in (ROOT / top).rglob("*.py")
    }
    assert code_dirs - found == set()
    assert {"converter.passes.moe", "converter.hf", "runtime.moe"} <= found
    assert not {p for p in found if p.split(".")[0] in {"tests", "benchmarks"}}
