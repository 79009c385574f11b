"""`ModelRunner`: runs one rank's model on a step's `StepInputs` over its KV caches.

`execute` uploads the step (one packed copy from pinned memory on CUDA, never waiting
for the device), makes its `InputMetadata` (`StepInputs.to_device`), runs the model
(``self.forward``: the model itself, or a `CompiledModel` over it, see `compile.py`) and
``model.compute_logits`` at the step's `logits_indices`. Decode-only batches replay CUDA
graphs (see `cuda_graphs.py`). The engine's workers, `hf2paged verify` and the demo all
drive models through it.

`sampled` holds the previous step's sampled ids on this device (the engine sets it after
each step): a step prepared before the host knew them reads its pending input ids there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from runtime.engine.compile import CompiledModel
from runtime.engine.cuda_graphs import DecodeGraphs
from runtime.engine.kernel_warmup import warm_up_kernels
from runtime.engine.step_inputs import StepInputs, StepTensors

log = logging.getLogger(__name__)


class ModelRunner:
    """Runs one rank's model over its KV caches; eager, or CUDA graphs for decodes."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        device: torch.device,
        max_num_seqs: int = 256,
        max_model_len: int = 2048,
        use_cuda_graphs: bool = False,
        agree: Callable[[bool], bool] | None = None,
        warm_up: bool = False,
        compile: bool | str = False,
        max_num_batched_tokens: int | None = None,
    ) -> None:
        """`warm_up`: compile every attention-kernel variant now (kernel_warmup.py), not in
        the first serving steps. `agree`: the TP ranks' vote on their graph captures.
        `compile`: run the model's repeated blocks through torch.compile (compile.py):
        True for Inductor, or a torch.compile backend's name (the CPU tests trace with
        "aot_eager"); with `warm_up` the compilation happens there too. ``startup_seconds`` records
        how long the warm-up (compilation included) and the graph captures took.
        `max_num_batched_tokens`: the step token budget the warm-up covers for the
        mixture-of-experts kernels (None: they compile when first met)."""
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = kv_caches[0].shape[2]
        # The last step's sampled ids ([N] int64 on `device`), or None.
        self.sampled: torch.Tensor | None = None
        self.graphs = None
        self.compiled: CompiledModel | None = None
        if compile:
            self.compiled = CompiledModel(model, "inductor" if compile is True else compile)
        # model(input_ids, positions, kv_caches, metadata) -> hidden states [T, hidden]
        self.forward: Callable = self.compiled or model
        self.startup_seconds: dict[str, float] = {}
        self.max_num_batched_tokens = max_num_batched_tokens
        if warm_up:
            start = time.perf_counter()
            self._warm_up(max_num_seqs)
            self.startup_seconds["warm_up"] = time.perf_counter() - start
        if use_cuda_graphs and device.type == "cuda":
            start = time.perf_counter()
            self.graphs = DecodeGraphs.capture(self, max_num_seqs, max_model_len, agree)
            self.startup_seconds["cuda_graphs"] = time.perf_counter() - start

    def _warm_up(self, max_num_seqs: int) -> None:
        """`warm_up_kernels`; a model that fails to compile runs eagerly (on one process:
        tensor-parallel ranks must not leave each other halfway through a step)."""
        try:
            warm_up_kernels(self, max_num_seqs, self.max_num_batched_tokens)
        except Exception as exc:  # noqa: BLE001 — the eager model still serves
            if self.compiled is None or torch.distributed.is_initialized():
                raise
            log.warning("torch.compile of the model failed (%s); running it eagerly", exc)
            self.eager()
            warm_up_kernels(self, max_num_seqs, self.max_num_batched_tokens)

    def eager(self) -> None:
        """Stop running compiled blocks (before any graph is captured)."""
        if self.compiled is not None:
            self.compiled.restore()
            self.compiled = None
        self.forward = self.model

    def release_graphs(self) -> None:
        """Destroy the decode graphs (before the TP group goes; see DecodeGraphs.release)."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """int64 host arrays -> device tensors (same shapes): on CUDA, packed into one
        pinned buffer and copied once, asynchronously."""
        if self.device.type != "cuda":
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        total = sum(a.size for a in arrays)
        # A fresh buffer of torch's caching pinned allocator, which hands it out again
        # only once this copy is done: steps in flight never share a buffer, and nothing
        # waits for the device here.
        staging = torch.empty(max(total, 1), dtype=torch.int64, pin_memory=True)
        host = staging.numpy()
        offset = 0
        for a in arrays:
            host[offset : offset + a.size] = a.reshape(-1)
            offset += a.size
        packed = staging[:total].to(self.device, non_blocking=True)  # [total]
        out, offset = [], 0
        for a in arrays:
            out.append(packed[offset : offset + a.size].view(a.shape))
            offset += a.size
        return out

    def tensors(self, inputs: StepInputs) -> StepTensors:
        """The step's input ids, positions and `InputMetadata` on this runner's device."""
        return inputs.to_device(self.device, self.upload, self.sampled)

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Logits ``[N, vocab]`` at the step's `logits_indices` (None when there are none).

        Every TP rank calls this with the same inputs: the model's collectives pair up.
        """
        if self.graphs is not None and inputs.is_decode_only and self.graphs.fits(inputs):
            hidden, metadata = self.graphs.run(inputs)
        else:
            ids, pos, metadata = self.tensors(inputs)
            hidden = self.forward(ids, pos, self.kv_caches, metadata)  # [T, hidden]
        if inputs.logits_indices.size == 0:
            return None
        return self.model.compute_logits(hidden, metadata)  # [N, vocab]
