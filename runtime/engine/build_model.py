"""`build_model`: a checkpoint's generated model, built on its device and loaded.

The one place that turns a model directory (or GGUF file) into a ready generated model:
the engine's workers, `hf2paged verify`, `hf2paged coverage`, the demo and the parity
tests all call it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from runtime.engine.loading import architecture
from runtime.loader import iter_weights, load_config
from runtime.parallel import get_tp_size


def build_model(
    model_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tp: int | None = None,
    *,
    config=None,
    model_class: type[nn.Module] | None = None,
) -> nn.Module:
    """The generated model of `model_dir` in eval mode: parameters created in `dtype` on
    `device`, then loaded strictly from the checkpoint through `load_weights` (streamed one
    tensor at a time; under tensor parallelism each rank keeps its shard).

    `tp`: the tensor-parallel size the caller expects; the process must already be one
    rank of a group of that size (`runtime.parallel.init_parallel`), else ValueError.
    `config`: the transformers config (default: read from `model_dir`). `model_class`:
    the class to build (default: the registry's class for the config's architecture; a
    freshly converted module's class in `hf2paged coverage`).
    """
    if tp is not None and tp != get_tp_size():
        raise ValueError(
            f"build_model(tp={tp}) in a process whose tensor-parallel group has size "
            f"{get_tp_size()}: call runtime.parallel.init_parallel({tp}, rank=...) in each rank first"
        )
    config = load_config(model_dir) if config is None else config
    if model_class is None:
        import generated

        arch = architecture(config)
        if arch is None:
            raise ValueError(f'{model_dir}: the config names no architecture ("architectures")')
        model_class = generated.get_model_class(arch, getattr(config, "model_type", None))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    model.load_weights(iter_weights(model_dir))
    return model.eval()
