"""Model directories that carry their own code (config.json's `auto_map`, as Hub
repositories with custom architectures have it), converted on the user's behalf.

`hf2paged convert DIR`, `LLM(DIR, trust_remote_code=True)` and `--trust-remote-code` on
`generate` / `verify` / `serve` convert the directory's modeling file once per version
of its code into the per-user cache of generated modules:

    $XDG_CACHE_HOME/hf2paged/modules/hf2paged_modules/<type>_<sha256 prefix>/
        __init__.py            the registry of this package (as generated/__init__.py)
        <type>.py              the generated module
        configuration_<x>.py   the directory's own modules it imports, copied beside it

The sha256 covers the modeling file, the modules beside it that it imports, and the
hf2paged and transformers versions: an edit to the code makes a new package, converted
on first use. `<cache>/hf2paged/modules` goes on `sys.path` (spawned tensor-parallel
ranks inherit it), so the generated class pickles by name and imports its configuration
module with no PYTHONPATH. The registry in generated/ searches this cache too.

Without `trust_remote_code`, a directory whose model type transformers does not know is
refused with one line; one it knows runs on transformers' own code (generated/), as
transformers itself does.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from converter.convert import Generated, generate, outputs
from converter.errors import ConversionError
from converter.hf.local import auto_model_ref, read_config, sources_sha256
from converter.hf.resolve import Source, resolve, transformers_version
from converter.render import hf2paged_version
from converter.render.registry import USER_PACKAGE
from converter.render.writer import write_files
from hf2paged.user_cache import build_once, user_cache_dir

KEY_LENGTH = 16  # hex digits of the sha256 in a package's name


class RemoteCodeRefused(ValueError):
    """A model directory carries its own code and the caller did not allow running it."""


def modules_root() -> Path:
    """The directory on `sys.path` that holds the `hf2paged_modules` namespace package
    (the same place generated/__init__.py's `user_modules_root()` searches)."""
    return user_cache_dir() / "modules"


def code_key(source: Source) -> str:
    """sha256 of the code a conversion reads and of what shapes its output."""
    return sources_sha256(
        source.path, source.siblings, f"hf2paged {hf2paged_version()}", transformers_version()
    )


def package_dir(source: Source) -> Path:
    """The cache package of `source`'s current code."""
    return modules_root() / USER_PACKAGE / f"{source.model_type}_{code_key(source)[:KEY_LENGTH]}"


def convert_into_cache(
    source: Source, generated: Generated | None = None
) -> tuple[Path, float | None]:
    """The cache package of `source` (converted now unless present): its directory and
    the seconds the conversion took, or None when it was already there."""
    final = package_dir(source)

    def build(tmp: Path) -> None:
        write_files(outputs(tmp, [generated if generated is not None else generate(source)]))

    return final, build_once(final, "__init__.py", build)


def import_package(package: Path):
    """The registry module of a cache package (its root put on sys.path once)."""
    root = str(package.parent.parent)
    if root not in sys.path:
        sys.path.append(root)
    importlib.invalidate_caches()
    return importlib.import_module(f"{USER_PACKAGE}.{package.name}")


def own_code_ref(model_dir: Path) -> str | None:
    """`auto_map`'s causal-LM entry of a model directory's config.json, if any."""
    if not (model_dir.is_dir() and (model_dir / "config.json").is_file()):
        return None
    return auto_model_ref(read_config(model_dir))


def _known_to_transformers(model_dir: Path) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return read_config(model_dir).get("model_type") in CONFIG_MAPPING_NAMES


def uses_own_code(model_dir: Path, trust_remote_code: bool) -> bool:
    """Whether `model_dir` runs on its own code: it has some and the caller allows it.
    Without permission, a model type transformers knows runs on transformers' code (as
    transformers does); any other is refused with one line naming how to allow it."""
    ref = own_code_ref(model_dir)
    if ref is None:
        return False
    if trust_remote_code:
        return True
    if _known_to_transformers(model_dir):
        return False
    raise RemoteCodeRefused(
        f"{model_dir} carries its own model code ({ref} in config.json's auto_map), which "
        "hf2paged would convert and run: pass --trust-remote-code (trust_remote_code=True "
        "in Python) to allow it"
    )


def model_class(model_dir: Path, log: Callable[[str], None] | None = None) -> type:
    """The generated class of `model_dir`'s own code, converted into the cache if this
    version of the code was never converted (`log` hears about it)."""
    try:
        source = resolve(str(model_dir))
        package, seconds = convert_into_cache(source)
    except ConversionError as exc:
        raise ValueError(f"cannot convert {model_dir}'s own code: {exc}") from None
    if seconds is not None and log is not None:
        log(
            f"converted {model_dir}'s own code ({source.path.name}) in {seconds:.1f} s; "
            f"cached in {package}"
        )
    ref = own_code_ref(model_dir)
    architecture = ref.rpartition(".")[2] if ref else None
    config_archs = read_config(model_dir).get("architectures") or []
    registry = import_package(package)
    for name in [architecture, *config_archs]:
        if name and name in registry.supported_architectures():
            return registry.get_model_class(name)
    raise ValueError(
        f"{model_dir}: the converted code has no class {architecture or config_archs!r} "
        f"(it has {', '.join(registry.supported_architectures()) or 'none'})"
    )
