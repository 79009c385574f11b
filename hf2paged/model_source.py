"""What a user points `generate`, `verify`, `serve` or `hf2paged.LLM` at, made into what
the engine loads: a transformers model directory, and the generated class when
hf2paged had to make it.

- a model directory: used as it is, on the registry's generated class;
- a GGUF file (or a directory holding one GGUF file and no config.json): converted once
  into a cached safetensors model directory (`gguf_cache.py`), with progress lines;
- a model directory with its own code (config.json's `auto_map`), with
  `trust_remote_code`: its code converted once into the per-user cache of generated
  modules (`remote_code.py`), the engine handed the class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hf2paged.options import check_model_dir


@dataclass(frozen=True)
class ModelSource:
    path: Path  # a transformers model directory (config.json + weights)
    model_class: type | None = None  # the generated class, when hf2paged had to make it


def gguf_of(path: Path) -> Path | None:
    """The GGUF file `path` names: the path itself, or the one GGUF file of a directory
    without config.json; None for a transformers model directory."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return None


def prepare_model(
    path: str | Path,
    trust_remote_code: bool = False,
    log: Callable[[str], None] | None = None,
) -> ModelSource:
    """`path` checked (one-line ValueError: missing, not a model; `RemoteCodeRefused`
    for a directory with its own code and no permission) and made loadable. `log`
    receives progress lines of slow first-time work (a GGUF or code conversion)."""
    from hf2paged import remote_code
    from hf2paged.gguf_cache import ensure_hf_model_dir

    log = log or (lambda line: None)
    path = check_model_dir(Path(path))
    gguf = gguf_of(path)
    if gguf is not None:
        path, _ = ensure_hf_model_dir(gguf, log=log)
    if remote_code.uses_own_code(path, trust_remote_code):
        return ModelSource(path, remote_code.model_class(path, log))
    return ModelSource(path)
