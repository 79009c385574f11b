"""Find the modeling file to convert: a model type (`opt`) in the installed transformers,
or a path to a `modeling_<type>.py` file."""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from converter.errors import ConversionError
from converter.hf.local import identifier, local_modules, modeling_file_of, read_config


@dataclass(frozen=True)
class Source:
    """One conversion input: the file and the model type it defines.

    A file outside transformers (`local`: a model directory's own code) may import
    modules beside it; `siblings` maps their names to their files (converter/hf/local.py).
    """

    path: Path
    model_type: str
    siblings: dict[str, Path] = field(default_factory=dict, hash=False, compare=False)
    local: bool = False


@cache
def transformers_root() -> Path:
    """The installed transformers package directory (found without importing it), with
    symlinks resolved: source paths are compared with it after `Path.resolve`, and a
    symlinked install (a linked virtual environment) must give the same headers."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            "transformers is not installed", hint="pip install 'transformers==5.24.0'"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve()


@cache
def transformers_version() -> str:
    return importlib.metadata.version("transformers")


def installed_model_types() -> list[str]:
    models = transformers_root() / "models"
    return sorted(
        p.parent.name
        for p in models.glob("*/modeling_*.py")
        if p.stem == f"modeling_{p.parent.name}"
    )


def module_name(model_type: str) -> str:
    """The `models/<name>/` directory of a model type: the type itself with `_` for `-`,
    else transformers' own mapping (`openai-gpt` lives in `models/openai/`), imported
    only then."""
    name = model_type.replace("-", "_")
    if (transformers_root() / "models" / name).is_dir():
        return name
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    return model_type_to_module_name(model_type)


def modeling_file(model_type: str) -> Path:
    """`models/<name>/modeling_<name>.py` of the installed transformers (`module_name`)."""
    name = module_name(model_type)
    path = transformers_root() / "models" / name / f"modeling_{name}.py"
    if not path.is_file():
        close = difflib.get_close_matches(name, installed_model_types(), n=3)
        hint = (
            f"did you mean {', '.join(close)}?"
            if close
            else "pass a path to a modeling_<type>.py file"
        )
        raise ConversionError(
            f"unknown model type {model_type!r}: transformers {transformers_version()} has no "
            f"models/{name}/modeling_{name}.py",
            hint=hint,
        )
    return path


def configuration_file(model_type: str) -> Path | None:
    """`models/<name>/configuration_<name>.py`, or None when the type has none installed."""
    name = module_name(model_type)
    path = transformers_root() / "models" / name / f"configuration_{name}.py"
    return path if path.is_file() else None


def _looks_like_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target or Path(target).exists()


def resolve(target: str) -> Source:
    """A model type, a modeling file or a model directory -> the modeling file and its
    model type (and, for code outside transformers, the modules beside it it imports)."""
    if not _looks_like_path(target):
        return Source(modeling_file(target), module_name(target))
    path = Path(target)
    if not path.exists():
        raise ConversionError(
            "no such file or directory",
            path=path,
            hint="pass a modeling_<type>.py path, a model directory or a model type",
        )
    if path.is_dir():
        return _resolve_directory(path)
    if path.suffix != ".py":
        raise ConversionError("not a Python file", path=path, hint="pass a modeling_<type>.py file")
    if not path.stem.startswith("modeling_") or path.stem == "modeling_":
        raise ConversionError(
            "cannot tell the model type from the file name",
            path=path,
            hint="name the file modeling_<type>.py",
        )
    return _file_source(path.resolve(), path.stem[len("modeling_") :])


def _file_source(path: Path, model_type: str) -> Source:
    """A modeling file: part of a transformers tree (its relative imports resolve in
    transformers) or local code with its sibling modules."""
    if "transformers" in path.parts:
        return Source(path, model_type)
    return Source(path, identifier(model_type), local_modules(path), local=True)


def _resolve_directory(directory: Path) -> Source:
    """A model directory: the modeling file config.json's `auto_map` names; without
    one, transformers' own code for its model type."""
    config = read_config(directory)
    modeling = modeling_file_of(directory, config)
    if modeling is not None:
        model_type = config.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            model_type = modeling.stem.removeprefix("modeling_")
        return _file_source(modeling.resolve(), model_type)
    model_type = config.get("model_type")
    own = sorted(directory.glob("modeling_*.py"))
    if isinstance(model_type, str) and model_type:
        if _installed(model_type) or not own:
            return Source(modeling_file(model_type), module_name(model_type))
    if len(own) == 1:
        return _file_source(own[0].resolve(), model_type or own[0].stem.removeprefix("modeling_"))
    raise ConversionError(
        "config.json has no auto_map modeling file and names no model type of the installed "
        f"transformers; the directory holds {len(own)} modeling_*.py files",
        path=directory / "config.json",
        hint="pass the modeling_<type>.py file, or name it in config.json's auto_map",
    )


def _installed(model_type: str) -> bool:
    """Whether the installed transformers has a models/ directory for `model_type`."""
    try:
        name = module_name(model_type)
    except (ImportError, KeyError, ValueError):
        return False
    return bool(name) and (transformers_root() / "models" / name).is_dir()


def display_path(path: Path) -> str:
    """`models/<type>/modeling_<type>.py` for installed files (stable across machines),
    the path as given otherwise."""
    try:
        return path.resolve().relative_to(transformers_root()).as_posix()
    except ValueError:
        return path.name
