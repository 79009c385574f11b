"""Checks of the serving commands' options (`generate`, `bench`, `demo`): one-line
ValueErrors before anything heavy is loaded."""

from __future__ import annotations

import json
from pathlib import Path

DTYPES = ("auto", "float32", "float16", "bfloat16")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def check_model_dir(model_dir: Path) -> Path:
    """`model_dir` if it looks like a model the engine can load (a transformers directory,
    or a GGUF file / a directory holding one), else ValueError naming what is wrong."""
    if not model_dir.exists():
        raise ValueError(f"MODEL_DIR {model_dir} does not exist")
    if model_dir.is_file():
        if model_dir.suffix == ".gguf":
            return model_dir
        raise ValueError(
            f"MODEL_DIR {model_dir} is not a directory (pass the folder holding config.json) or a .gguf file"
        )
    config = model_dir / "config.json"
    ggufs = list(model_dir.glob("*.gguf"))
    if not config.is_file():
        if len(ggufs) == 1:
            return model_dir
        raise ValueError(
            f"MODEL_DIR {model_dir} has no config.json"
            + (
                " and several .gguf files: pass the path of one"
                if ggufs
                else "; it is not a transformers model directory"
            )
        )
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{config} is not valid JSON: {err}") from None
    if not ggufs and not any(next(model_dir.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ValueError(
            f"MODEL_DIR {model_dir} has no weights (*.safetensors, pytorch_model*.bin or *.gguf)"
        )
    return model_dir


def torch_dtype(name: str | None):
    """`None` for auto (the engine's choice: the checkpoint's dtype on GPU, float32 on CPU)."""
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}; expected one of {', '.join(DTYPES)}")
    import torch

    return getattr(torch, name)


def check_device(device: str | None) -> None:
    """ValueError for a device the engine cannot run on (`gpu`, `cuda` without CUDA)."""
    if device is None:
        return
    from runtime.engine.config import resolve_device

    try:
        resolve_device(device)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"--device {device!r}: {one_line(err)}") from None


def one_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


EXPERT_PARALLEL_HELP = (
    "With --tp > 1: mixture-of-experts layers hold whole experts per rank instead of a "
    "slice of every expert."
)

TRUST_REMOTE_CODE_HELP = (
    "Allow a model directory's own code (config.json's auto_map): hf2paged converts it once "
    "into the per-user cache and runs it, and transformers runs its config code."
)


def check_remote_code(model_dir: Path, trust_remote_code: bool) -> None:
    """`RemoteCodeRefused` (a ValueError) for a directory with its own code run without
    --trust-remote-code, before anything is loaded."""
    from hf2paged.remote_code import uses_own_code

    if model_dir.is_dir():
        uses_own_code(model_dir, trust_remote_code)
