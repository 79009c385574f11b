"""Every module a generated file imports at load time must exist here.

A modeling file may import something this environment lacks (a relative import of a
sibling file that is not installed, an optional kernel package). If the converted code
still uses it, the generated module would fail at import in the serving process; the
converter reports it now instead, at the source line that imports it. Imports that
ruff removed as unused, and imports guarded by `if`/`try`, do not matter.

Only module existence is checked, without importing anything that is not already
imported (the converter must not run the runtime's or third-party module code): the
module is looked up on the search path of its top-level package.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

from converter.errors import ConversionError
from converter.render import REPO_ROOT

OURS = ("runtime", "generated")  # this repository's packages, found under REPO_ROOT


def _search(locations: list[str], parts: list[str]) -> bool:
    suffixes = importlib.machinery.all_suffixes()
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        packages = [Path(loc) / part for loc in locations if (Path(loc) / part).is_dir()]
        if packages:
            locations = [str(p) for p in packages]
            continue
        files = [Path(loc) / f"{part}{s}" for loc in locations for s in suffixes]
        return last and any(f.is_file() for f in files)
    return True


def module_available(name: str) -> bool:
    """Whether `import name` can find the module (never imports a new package)."""
    top, *rest = name.split(".")
    if name in sys.modules or top in sys.stdlib_module_names:
        return True  # stdlib modules may alias submodules (os.path); trust them
    if top in OURS:
        return _search([str(REPO_ROOT)], [top, *rest])
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if not rest:
        return True
    return bool(spec.submodule_search_locations) and _search(
        list(spec.submodule_search_locations), rest
    )


def _imported_modules(tree: ast.Module) -> list[tuple[str, set[str], ast.stmt]]:
    """(module, names it binds, statement) of every unconditional module-level import."""
    found = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                found.append((alias.name, {alias.asname or alias.name.split(".")[0]}, stmt))
        elif isinstance(stmt, ast.ImportFrom) and stmt.module and not stmt.level:
            if stmt.module == "__future__":
                continue
            names = {a.asname or a.name for a in stmt.names}
            found.append((stmt.module, names, stmt))
    return found


def _source_import(source: str, names: set[str]) -> ast.stmt | None:
    """The source's import statement binding any of `names` (where the user can look)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound = {a.asname or a.name.split(".")[0] for a in node.names}
            if bound & names:
                return node
    return None


def check_imports(generated: str, source: str, source_path: str | Path) -> None:
    """Raise a ConversionError for the first import of `generated` that cannot resolve."""
    for module, names, _ in _imported_modules(ast.parse(generated)):
        if module_available(module):
            continue
        origin = _source_import(source, names)
        line = origin.lineno if origin is not None else None
        construct = source.splitlines()[line - 1] if line else None
        if isinstance(origin, ast.ImportFrom) and origin.level == 1:
            missing = origin.module.split(".")[0] if origin.module else module.rsplit(".", 1)[-1]
            hint = (
                f"a one-dot import names a module beside the modeling file: put {missing}.py "
                "there (it is copied beside the generated module), or import it from "
                "transformers"
            )
        elif isinstance(origin, ast.ImportFrom) and origin.level:
            hint = (
                "relative imports that climb out of the file's directory resolve inside "
                "transformers (as from models/<type>/): make the import absolute"
            )
        elif module.split(".")[0] == "transformers":
            hint = (
                "this transformers has no such module: convert with the transformers the "
                "file comes from"
            )
        else:
            hint = (
                f"install the package that provides {module.split('.')[0]!r}, or remove its "
                "use from the modeling file"
            )
        raise ConversionError(
            f"the converted module imports {module!r}, which is not available here",
            path=source_path,
            line=line,
            construct=construct,
            hint=hint,
        )
