"""`Worker` (one rank: model, weights, KV cache, runner) and `Executor` (rank 0's handle
on all ranks).

With ``tensor_parallel_size > 1`` the executor spawns ranks 1..N-1 as processes
(torch.multiprocessing, spawn) and is rank 0 itself: rank 0 schedules and samples, and
broadcasts each step's `StepInputs` over a gloo group (a CPU one beside NCCL on GPUs);
every rank runs the model on them, so the model's collectives pair up. After a step that
samples, rank 0 broadcasts the sampled ids over the TP group (on the device, no host
sync): every rank keeps them for the next step, which may read its input ids there.
"""

from __future__ import annotations

import os
import socket
import traceback
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runtime.engine.build_model import build_model
from runtime.engine.config import EngineConfig
from runtime.engine.model_runner import ModelRunner
from runtime.engine.step_inputs import StepInputs, dummy_prefill
from runtime.kv_cache import (
    allocate_kv_caches,
    cuda_kv_budget_bytes,
    kv_cache_block_bytes,
    num_blocks_for_budget,
)
from runtime.loader import load_config

# KV cache on CPU without kv_cache_memory_bytes: room for this many full contexts, but
# no more than this many bytes (CPU memory is shared with everything else).
CPU_DEFAULT_CONTEXTS = 4
CPU_DEFAULT_MAX_BYTES = 512 << 20


class Worker:
    """One rank: builds the generated model, loads its weights, owns its KV cache."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.device_type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.model = build_model(
            config.model,
            config.dtype,
            self.device,
            config.tensor_parallel_size,
            config=load_config(config.model, trust_remote_code=config.trust_remote_code),
            model_class=config.model_class,
        )
        self.runner: ModelRunner | None = None

    def available_blocks(self) -> int:
        cfg = self.config
        block_bytes = kv_cache_block_bytes(self.model, cfg.block_size, cfg.dtype)
        if cfg.kv_cache_memory_bytes is not None:
            return num_blocks_for_budget(cfg.kv_cache_memory_bytes, block_bytes)
        if self.device.type != "cuda":
            tokens = CPU_DEFAULT_CONTEXTS * cfg.max_model_len
            return max(1, min(-(-tokens // cfg.block_size), CPU_DEFAULT_MAX_BYTES // block_bytes))
        return num_blocks_for_budget(
            cuda_kv_budget_bytes(self.device, cfg.gpu_memory_utilization, self._profile()),
            block_bytes,
        )

    @torch.inference_mode()
    def _profile(self) -> int:
        """Peak bytes of weights + activations for the largest step the scheduler can
        make (`max_num_batched_tokens` tokens in prompts of at most `max_model_len`)."""
        cfg = self.config
        tokens = cfg.max_num_batched_tokens
        lens = [cfg.max_model_len] * (tokens // cfg.max_model_len)
        if tokens % cfg.max_model_len:
            lens.append(tokens % cfg.max_model_len)
        lens = lens[: cfg.max_num_seqs]
        blocks = [-(-n // cfg.block_size) for n in lens]
        caches = allocate_kv_caches(self.model, sum(blocks), cfg.block_size, cfg.dtype, self.device)
        cache_bytes = sum(c.numel() * c.element_size() for c in caches)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        runner = ModelRunner(self.model, caches, self.device)
        runner.execute(dummy_prefill(lens, cfg.block_size))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - cache_bytes
        del caches, runner
        torch.cuda.empty_cache()
        return peak

    def init_cache(self, num_blocks: int, group=None) -> None:
        """Allocate the KV cache and capture the decode graphs; `group` (the CPU group of
        the TP ranks) keeps the ranks' captures in step."""
        cfg = self.config
        caches = allocate_kv_caches(self.model, num_blocks, cfg.block_size, cfg.dtype, self.device)
        max_len = min(cfg.max_model_len, num_blocks * cfg.block_size)
        agree = None
        if cfg.tensor_parallel_size > 1:
            agree = lambda ok: _all_ranks(ok, group)  # noqa: E731
        self.runner = ModelRunner(
            self.model, caches, self.device, cfg.max_num_seqs, max_len, cfg.use_cuda_graphs,
            agree, warm_up=self.device.type == "cuda", compile=cfg.use_compile,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
        )  # fmt: skip

    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        return self.runner.execute(inputs)

    def receive_sampled(self, inputs: StepInputs) -> None:
        """Ranks 1..N-1: take rank 0's sampled ids of the step just run (if it sampled)."""
        self.runner.sampled = None
        num = inputs.logits_indices.size
        if num:
            from runtime.parallel import get_tp_group

            ids = torch.empty(num, dtype=torch.int64, device=self.device)
            dist.broadcast(ids, src=0, group=get_tp_group())
            self.runner.sampled = ids

    def close(self) -> None:
        """Release what must go before the process group: the captured decode graphs."""
        if self.runner is not None:
            self.runner.release_graphs()


def _all_ranks(ok: bool, group) -> bool:
    """True when `ok` on every rank (a MIN all-reduce over the CPU group)."""
    t = torch.tensor([int(ok)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(config: EngineConfig, rank: int) -> dist.ProcessGroup | None:
    """Join the TP group; returns the CPU group for control messages."""
    from runtime.parallel import init_parallel

    backend = "nccl" if config.device_type == "cuda" else "gloo"
    init_parallel(config.tensor_parallel_size, rank=rank, backend=backend,
                  init_method=config.dist_init_method,
                  expert_parallel=config.expert_parallel)  # fmt: skip
    return dist.new_group(backend="gloo") if backend == "nccl" else None


def _start(config: EngineConfig, group) -> tuple[Worker | None, BaseException | None, str | None]:
    """Build this rank's worker and agree with the others on the block count. Every rank
    joins the agreement even when its build failed, so nobody waits forever. Returns the
    worker, or this rank's exception and its traceback."""
    worker, exc, error, blocks = None, None, None, 0
    try:
        worker = Worker(config)
        blocks = worker.available_blocks()
    except Exception as e:  # noqa: BLE001 — reported through the agreement below
        exc, error = e, traceback.format_exc()
    # MIN over ranks: a failed rank contributes 0 and everyone sees it.
    t = torch.tensor([blocks if error is None else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    num_blocks = int(t.item())
    if error is None and num_blocks <= 0:
        error = _PEER_FAILED
    if error is None:
        worker.init_cache(num_blocks, group)
    return worker, exc, error


_PEER_FAILED = "another tensor-parallel rank failed to start (see its error output)"


def worker_main(rank: int, config: EngineConfig, conn) -> None:
    """Entry point of ranks 1..N-1: run steps as rank 0 broadcasts them, until "exit"."""
    from runtime.parallel import destroy_parallel

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    worker = None
    try:
        group = _setup(config, rank)
        worker, _, error = _start(config, group)
        conn.send(error)
        if error is not None:
            return
        while True:
            msg = [None]
            dist.broadcast_object_list(msg, src=0, group=group)
            kind, payload = msg[0]
            if kind == "exit":
                break
            worker.execute(payload)
            worker.receive_sampled(payload)
    except Exception:  # noqa: BLE001 — tell rank 0 why, if it still listens
        try:
            conn.send(traceback.format_exc())
        except Exception:  # noqa: BLE001
            pass
    finally:
        if worker is not None:
            worker.close()
        destroy_parallel()


class Executor:
    """Runs steps on every rank; lives in the engine's process as rank 0."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.procs: list = []
        self.conns: list = []
        self.group = None
        tp = config.tensor_parallel_size
        if tp == 1:
            self.worker = Worker(config)
            self.num_blocks = self.worker.available_blocks()
            self.worker.init_cache(self.num_blocks)
            return
        config = replace(config, dist_init_method=f"tcp://127.0.0.1:{_free_port()}")
        self.config = config
        ctx = mp.get_context("spawn")
        for rank in range(1, tp):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(rank, config, child), daemon=True)
            p.start()
            self.procs.append(p)
            self.conns.append(parent)
        try:
            self.group = _setup(config, 0)
            worker, exc, error = _start(config, self.group)
            errors = [c.recv() for c in self.conns]
        except BaseException:
            self._kill()
            raise
        if exc is not None:  # rank 0's own error (a bad checkpoint): raise it as is
            self.shutdown(graceful=False)
            raise exc
        errors = [e for e in [error, *errors] if e is not None]
        if errors:
            self.shutdown(graceful=False)
            first = next((e for e in errors if e != _PEER_FAILED), errors[0])
            raise RuntimeError(f"tensor-parallel startup failed on another rank:\n{first}")
        self.worker = worker
        self.num_blocks = worker.runner.kv_caches[0].shape[1]

    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Logits of the step on rank 0; every step that has logits must be followed by
        `keep_sampled` (the other ranks wait for its ids)."""
        if self.procs:
            dist.broadcast_object_list([("step", inputs)], src=0, group=self.group)
        return self.worker.execute(inputs)

    def keep_sampled(self, token_ids: torch.Tensor | None, num: int) -> None:
        """The step's `num` sampled ids (``[num]`` int64 on the device) for the next step
        on every rank; None when sampling failed (the ranks still pair up, with zeros)."""
        runner = self.worker.runner
        if num == 0:
            runner.sampled = None
            return
        if token_ids is None:
            token_ids = torch.zeros(num, dtype=torch.int64, device=self.worker.device)
        runner.sampled = token_ids
        if self.procs:
            from runtime.parallel import get_tp_group

            dist.broadcast(token_ids, src=0, group=get_tp_group())

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the other ranks (they leave their loop on "exit") and leave the group.
        After a failed start they have already returned: just reap them."""
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()  # every rank drops its graphs before the group is destroyed
        if not self.procs:
            return
        from runtime.parallel import destroy_parallel

        try:
            if graceful and all(p.is_alive() for p in self.procs):
                dist.broadcast_object_list([("exit", None)], src=0, group=self.group)
            for p in self.procs:
                p.join(timeout=30)
        finally:
            self._kill()
            destroy_parallel()

    def _kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self.procs = []
