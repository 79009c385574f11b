"""Stream a checkpoint's (name, tensor) pairs, one tensor at a time, and read its config.

Formats, in the order they are looked for in a model directory:
  1. safetensors shards (`model.safetensors.index.json` when present, else `*.safetensors`),
     memory-mapped through `safe_open`;
  2. PyTorch `.bin` shards (`pytorch_model.bin.index.json` when present), loaded with
     `torch.load(mmap=True, weights_only=True)` one shard at a time;
  3. one `.gguf` file, read through transformers' own GGUF support (its tensor
     processors and GGUF -> HF name map), dequantized one tensor at a time.

`model_dir` may also be the path of a `.gguf` file. Names are the checkpoint's own (HF
names for GGUF); the generated `load_weights` maps them onto parameters.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# .bin files in model directories that hold no weights.
_NON_WEIGHT_BINS = {"training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin"}


def _require_path(model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    return path


def _indexed_shards(directory: Path, index_name: str) -> list[tuple[Path, set[str]]] | None:
    """Shards named by an index file, in first-appearance order, each with its keys."""
    index_path = directory / index_name
    if not index_path.is_file():
        return None
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(
            f"{index_path}: not a checkpoint index with a 'weight_map' ({e})"
        ) from None
    shards: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, set()).add(key)
    missing = [name for name in shards if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{index_path} names shards that are missing: {', '.join(missing)}")
    return [(directory / name, keys) for name, keys in shards.items()]


def _gguf_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.gguf"))


def find_weight_files(model_dir: str | os.PathLike) -> tuple[str, list[Path]]:
    """(format, files) of the checkpoint in `model_dir`: "safetensors", "bin" or "gguf"."""
    path = _require_path(model_dir)
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", [path]
        raise ValueError(f"{path}: expected a model directory or a .gguf file")
    for fmt, index, pattern in (
        ("safetensors", SAFETENSORS_INDEX, "*.safetensors"),
        ("bin", BIN_INDEX, "*.bin"),
    ):
        indexed = _indexed_shards(path, index)
        if indexed is not None:
            return fmt, [shard for shard, _ in indexed]
        files = sorted(p for p in path.glob(pattern) if p.name not in _NON_WEIGHT_BINS)
        if files:
            return fmt, files
    ggufs = _gguf_files(path)
    if len(ggufs) == 1:
        return "gguf", ggufs
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ValueError(f"{path} holds several GGUF files ({names}); pass the path of one")
    raise FileNotFoundError(
        f"no weights in {path}: looked for {SAFETENSORS_INDEX}, *.safetensors, {BIN_INDEX}, "
        f"*.bin and *.gguf"
    )


def iter_weights(model_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every weight of the checkpoint, one tensor at a time."""
    fmt, files = find_weight_files(model_dir)
    if fmt == "gguf":
        yield from _iter_gguf(files[0])
        return
    directory = files[0].parent
    index = _indexed_shards(directory, SAFETENSORS_INDEX if fmt == "safetensors" else BIN_INDEX)
    wanted = dict(index) if index is not None else {}
    for file in files:
        keys = wanted.get(file)
        shard = _iter_safetensors(file) if fmt == "safetensors" else _iter_bin(file)
        seen = set()
        for name, tensor in shard:
            # With an index, it decides which shard a key belongs to.
            if keys is None or name in keys:
                seen.add(name)
                yield name, tensor
        if keys is not None and keys - seen:
            absent = ", ".join(sorted(keys - seen)[:5])
            raise ValueError(f"{file}: the index lists keys this shard does not hold: {absent}")


def _iter_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    # safe_open memory-maps the file; get_tensor materializes only the tensor asked for.
    with safe_open(str(file), framework="pt", device="cpu") as f:
        for name in f.keys():  # noqa: SIM118 — safe_open is not a Mapping
            yield name, f.get_tensor(name)


def _iter_bin(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        # mmap: tensors stay views of the file until copied into parameters.
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        # Pre-zip (legacy) serialization cannot be memory-mapped: read this one shard.
        state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a state dict, found {type(state).__name__}")
    names = list(state)
    for name in names:
        # Pop so that a tensor read without mmap is freed once the caller has used it.
        yield name, state.pop(name)


@functools.lru_cache(maxsize=4)
def _gguf_metadata(path: str, mtime_ns: int) -> dict:
    """transformers' parse of a GGUF file's metadata (slow for big vocabularies: cached)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(path, return_tensors=False)


def _gguf_config_dict(file: Path) -> dict:
    resolved = file.resolve()
    return copy.deepcopy(_gguf_metadata(str(resolved), resolved.stat().st_mtime_ns)["config"])


def _config_from_gguf(file: Path):
    from transformers import AutoConfig

    # What AutoConfig.from_pretrained(dir, gguf_file=...) builds, from the cached parse.
    return AutoConfig.for_model(**_gguf_config_dict(file))


def _iter_gguf(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a GGUF file under their HF names, dequantized one at a time.

    This is transformers' `load_gguf_checkpoint(return_tensors=True)` loop, unrolled so
    that it yields each tensor instead of collecting the whole model in a dict: the same
    reader, tensor processor (e.g. Llama's q/k un-permutation) and name map.
    """
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    config_dict = _gguf_config_dict(file)
    config = _config_from_gguf(file)
    # The GGUF -> HF name map is computed from a model's state_dict keys: a meta-device
    # skeleton gives them without allocating any weights.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    reader = GGUFReader(str(file))
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config_dict)
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    del skeleton
    parsed = {"config": config_dict, "tensors": {}}
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)  # numpy, HF layout after process()
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=name_map, parsed_parameters=parsed
        )
        if result.name not in name_map:
            continue
        yield name_map[result.name], torch.from_numpy(np.copy(result.weights))
    # Some processors assemble tensors from several GGUF tensors (MoE experts) or rename
    # outside the map (GPT-2's output.weight): they leave them here, complete only now.
    while parsed["tensors"]:
        name = next(iter(parsed["tensors"]))
        yield name, parsed["tensors"].pop(name)


def load_config(model_dir: str | os.PathLike, trust_remote_code: bool = False):
    """transformers' AutoConfig for `model_dir` (config.json), or the config in a GGUF file.

    A directory with its own configuration code (config.json's `auto_map`) needs
    `trust_remote_code=True` (never a prompt: False is passed explicitly, and then such a
    directory whose model type transformers does not know is a one-line ValueError)."""
    path = _require_path(model_dir)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a model directory or a .gguf file")
        return _config_from_gguf(path)
    if not (path / "config.json").is_file():
        ggufs = _gguf_files(path)
        if len(ggufs) == 1:
            return _config_from_gguf(ggufs[0])
        raise FileNotFoundError(
            f"no config.json in {path}"
            + (" (several .gguf files: pass the path of one)" if ggufs else "")
        )
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ValueError(
            f"{path} carries its own configuration code (config.json's auto_map): pass "
            "trust_remote_code=True to run it"
        ) from None
