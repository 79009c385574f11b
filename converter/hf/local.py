"""Model code that is not part of the installed transformers: a Hub-style model directory
(config.json's `auto_map` names its modeling file) or a modeling file with its siblings.

Such code imports its own modules by one-dot relative imports (`from .configuration_mylm
import MyLMConfig`); everything else comes from transformers, absolute (as Hub
repositories write it) or by climbing relative imports (`from ...activations`, a copied
transformers file). The generated module keeps the one-dot imports and the sibling
modules are written beside it, their climbing imports made absolute: the output
directory is a package that imports without the model directory on any path.

Only files are read here; nothing of the model's code runs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

from converter.errors import ConversionError

AUTO_MODEL_KEYS = ("AutoModelForCausalLM",)


def identifier(name: str) -> str:
    """A module name for `name` (a model type such as `my-lm`)."""
    ident = re.sub(r"\W", "_", name)
    return f"m_{ident}" if not ident or ident[0].isdigit() else ident


def read_config(directory: Path) -> dict:
    """config.json of a model directory, as JSON (one-line error when it is not)."""
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(
            "no config.json: not a model directory",
            path=directory,
            hint="pass a model directory, a modeling_<type>.py file or a model type",
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConversionError(f"cannot read config.json: {exc}", path=path) from None
    if not isinstance(data, dict):
        raise ConversionError("config.json does not hold an object", path=path)
    return data


def auto_model_ref(config: dict) -> str | None:
    """`auto_map`'s causal-LM entry ("modeling_mylm.MyLMForCausalLM"), if any."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        return None
    for key in AUTO_MODEL_KEYS:
        ref = auto_map.get(key)
        if isinstance(ref, (list, tuple)):  # (slow, fast) pairs are tokenizers'; be lenient
            ref = ref[0]
        if isinstance(ref, str):
            return ref
    return None


def modeling_file_of(directory: Path, config: dict) -> Path | None:
    """The modeling file `auto_map` names in `directory`; None without an `auto_map`
    causal-LM entry."""
    ref = auto_model_ref(config)
    if ref is None:
        return None
    path = directory / "config.json"
    if "--" in ref:
        repo = ref.split("--", 1)[0]
        raise ConversionError(
            f"auto_map points at code in another repository ({ref!r})",
            path=path,
            hint=f"download {repo}'s modeling file into this directory and name it in auto_map",
        )
    module, _, cls = ref.rpartition(".")
    if not module or not cls:
        raise ConversionError(f"auto_map entry {ref!r} is not <module>.<class>", path=path)
    modeling = directory / f"{module.replace('.', '/')}.py"
    if not modeling.is_file():
        raise ConversionError(
            f"auto_map names {module}.py, which is not in the directory",
            path=path,
            hint="copy the model's code files (modeling_*.py, configuration_*.py) beside config.json",
        )
    return modeling


def sibling_imports(tree: ast.Module, directory: Path) -> list[tuple[str, ast.ImportFrom]]:
    """(module name, statement) of every one-dot relative import of `tree` that names a
    module of `directory` (`from .x import A`, `from . import x`)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level != 1:
            continue
        names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
        for name in names:
            if (directory / f"{name}.py").is_file() or not node.module:
                found.append((name, node))
    return found


def local_modules(modeling: Path) -> dict[str, Path]:
    """{module name: file} of the sibling modules `modeling` imports, directly or through
    each other (one-dot relative imports of files beside it), sorted by name."""
    directory = modeling.parent
    found: dict[str, Path] = {}
    todo = [modeling]
    while todo:
        path = todo.pop()
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
            continue  # the conversion reports the modeling file's own syntax errors
        for name, _ in sibling_imports(tree, directory):
            file = directory / f"{name}.py"
            if name not in found and file.is_file() and file != modeling:
                found[name] = file
                todo.append(file)
    return dict(sorted(found.items()))


def sources_sha256(modeling: Path, siblings: dict[str, Path], *salt: str) -> str:
    """One digest of the modeling file and its sibling modules (names and bytes), and
    of `salt` (the versions that shape the output): a cache key that changes whenever
    the code does."""
    digest = hashlib.sha256()
    for part in salt:
        digest.update(part.encode() + b"\0")
    for name, path in [(modeling.name, modeling), *((f"{n}.py", p) for n, p in siblings.items())]:
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def check_sibling_imports(generated: str, source: str, source_path: Path, siblings) -> None:
    """Every one-dot import the generated module kept must name a sibling module found
    beside the source (else it would fail when the module is imported)."""
    for node in ast.walk(ast.parse(generated)):
        if isinstance(node, ast.ImportFrom) and node.level:
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            missing = [n for n in names if n not in siblings]
            if node.level > 1 or missing:
                origin = next(
                    (
                        s
                        for s in ast.walk(ast.parse(source))
                        if isinstance(s, ast.ImportFrom)
                        and s.level == node.level
                        and s.module == node.module
                    ),
                    None,
                )
                what = "." * node.level + (node.module or ", ".join(missing))
                raise ConversionError(
                    f"the converted module imports {what}, which is not a module beside the "
                    "modeling file",
                    path=source_path,
                    line=origin.lineno if origin is not None else None,
                    hint=f"put {missing[0] if missing else what}.py in {source_path.parent}, "
                    "or import it from transformers",
                )
