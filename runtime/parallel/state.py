"""Tensor-parallel state over torch.distributed: one TP group spanning the whole world.

A single process with `tp_size=1` needs no process group at all: every collective below
is then a no-op, so generated models run unchanged without `torch.distributed`.

Under `torchrun` (several processes, or several nodes) `init_parallel(tp_size)` reads
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the environment; tests
pass `rank=` and `init_method="tcp://127.0.0.1:PORT"` explicitly.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

_TP_SIZE = 1
_TP_RANK = 0
_TP_GROUP: dist.ProcessGroup | None = None
# Mixture-of-experts layers place whole experts per rank instead of sharding each one.
_EXPERT_PARALLEL = False
# Whether init_parallel created the default process group (and so destroy_parallel owns it).
_OWNS_PROCESS_GROUP = False


def divide(numerator: int, denominator: int) -> int:
    """`numerator // denominator`, raising ValueError when it does not divide evenly."""
    if denominator <= 0 or numerator % denominator != 0:
        raise ValueError(
            f"{numerator} is not divisible by {denominator} "
            f"(tensor-parallel size must divide every sharded dimension)"
        )
    return numerator // denominator


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def init_parallel(
    tp_size: int,
    rank: int | None = None,
    backend: str | None = None,
    init_method: str | None = None,
    timeout_s: float = 300.0,
    expert_parallel: bool = False,
) -> None:
    """Set up tensor parallelism over `tp_size` processes (this one is `rank`).

    ``expert_parallel``: mixture-of-experts layers (`runtime.moe.FusedMoE`) built after this
    hold whole experts per rank (expert parallelism over the same group) instead of a
    ``1 / tp_size`` slice of every expert; see `expert_parallel_enabled`.

    `backend` defaults to NCCL when CUDA is available, gloo otherwise. `init_method`
    defaults to `env://` (MASTER_ADDR / MASTER_PORT, as torchrun sets them). When the
    default process group already exists (the caller made it), it is reused.
    """
    global _TP_SIZE, _TP_RANK, _TP_GROUP, _OWNS_PROCESS_GROUP, _EXPERT_PARALLEL
    if tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp_size}")
    if _TP_GROUP is not None or _TP_SIZE != 1:
        raise ValueError("init_parallel called twice; call destroy_parallel() first")
    env_world = _env_int("WORLD_SIZE")
    if rank is None:
        rank = _env_int("RANK") or 0
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is outside [0, tp_size={tp_size})")

    _EXPERT_PARALLEL = bool(expert_parallel)
    if tp_size == 1 and not dist.is_initialized():
        # One process, no group: the collectives short-circuit on _TP_SIZE == 1.
        _TP_SIZE, _TP_RANK, _TP_GROUP = 1, 0, None
        return

    if dist.is_initialized():
        if dist.get_world_size() != tp_size:
            raise ValueError(
                f"torch.distributed world size is {dist.get_world_size()} but tp_size is "
                f"{tp_size}; only pure tensor parallelism (TP = world size) is supported"
            )
        rank = dist.get_rank()
    else:
        if env_world is not None and env_world != tp_size:
            raise ValueError(
                f"WORLD_SIZE={env_world} in the environment but tp_size={tp_size}; "
                f"launch with torchrun --nproc-per-node {tp_size} (pure TP only)"
            )
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if init_method is None:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise ValueError(
                    f"init_parallel(tp_size={tp_size}) needs {' and '.join(missing)} in the "
                    f"environment (launch with torchrun) or an explicit init_method="
                )
            init_method = "env://"
        if backend == "nccl":
            # One GPU per rank; LOCAL_RANK is the rank within this node under torchrun.
            local_rank = _env_int("LOCAL_RANK")
            if local_rank is None:
                local_rank = rank % max(1, torch.cuda.device_count())
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            world_size=tp_size,
            rank=rank,
            timeout=timedelta(seconds=timeout_s),
        )
        _OWNS_PROCESS_GROUP = True
    _TP_SIZE, _TP_RANK, _TP_GROUP = tp_size, rank, dist.group.WORLD


def destroy_parallel() -> None:
    """Tear down what init_parallel set up; safe to call when nothing was set up."""
    global _TP_SIZE, _TP_RANK, _TP_GROUP, _OWNS_PROCESS_GROUP, _EXPERT_PARALLEL
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _TP_SIZE, _TP_RANK, _TP_GROUP, _OWNS_PROCESS_GROUP = 1, 0, None, False
    _EXPERT_PARALLEL = False


def get_tp_size() -> int:
    return _TP_SIZE


def get_tp_rank() -> int:
    return _TP_RANK


def expert_parallel_enabled() -> bool:
    """Whether `init_parallel(..., expert_parallel=True)` asked MoE layers to place whole
    experts per rank (the default of `FusedMoE(expert_parallel=None)`)."""
    return _EXPERT_PARALLEL


def get_tp_group() -> dist.ProcessGroup | None:
    """The TP process group, or None when running as a single process (TP=1)."""
    return _TP_GROUP


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the TP group (in place when TP > 1); returns `x` unchanged at TP=1."""
    if _TP_SIZE == 1:
        return x
    return _all_reduce(x)


@torch.compiler.disable
def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    # A graph break under torch.compile (runtime/engine/compile.py): the collective runs
    # eagerly between the compiled pieces, in the same order on every rank.
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=_TP_GROUP)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order; identity at TP=1."""
    if _TP_SIZE == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, x, group=_TP_GROUP)
    return torch.cat(parts, dim=dim)  # [..., tp * x.shape[dim], ...]


def local_num_heads(total: int, sharded: bool = True) -> int:
    """Query heads on this rank: the TP size must divide the total. `sharded=False`: the
    layer runs every head on every rank (its plan gathered q/k/v for this config)."""
    if not sharded:
        return total
    tp = get_tp_size()
    if total % tp != 0:
        raise ValueError(f"{total} attention heads cannot be split over tensor_parallel_size={tp}")
    return total // tp


def local_num_kv_heads(total_kv: int, sharded: bool = True) -> int:
    """KV heads on this rank (`sharded=False`: all of them, as for `local_num_heads`).

    With tp > total_kv each rank keeps one KV head, replicated on tp // total_kv ranks:
    a query head needs its whole KV head, and splitting a head's dimension over ranks
    would need a collective inside attention.
    """
    if not sharded:
        return total_kv
    tp = get_tp_size()
    if total_kv >= tp:
        if total_kv % tp != 0:
            raise ValueError(
                f"{total_kv} key/value heads cannot be split over tensor_parallel_size={tp}"
            )
        return total_kv // tp
    if tp % total_kv != 0:
        raise ValueError(
            f"{total_kv} key/value heads cannot be replicated over tensor_parallel_size={tp} "
            f"(the TP size must be a multiple of the KV head count)"
        )
    return max(1, total_kv // tp)


def local_head_block(per_head: torch.Tensor | None, sharded: bool = True) -> torch.Tensor | None:
    """This rank's contiguous block of a per-query-head tensor [H, ...] (ALiBi slopes,
    attention sinks): [H / tp, ...]; the whole tensor when not `sharded`; None stays None."""
    if per_head is None or not sharded:
        return per_head
    return per_head.chunk(get_tp_size())[get_tp_rank()]
