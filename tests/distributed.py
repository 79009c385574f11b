"""Run a function on several local processes that form a gloo tensor-parallel group.

    from distributed import run_distributed   # tests/ is on sys.path under pytest

    def _check(rank, world_size, n):           # module level: it is pickled by name
        ...                                     # init_parallel has been called
        return something_picklable

    results = run_distributed(_check, 2, 5)     # [rank0_result, rank1_result]

Spawning costs a few seconds (each child imports torch), so group several checks in one
`fn`. A failing rank's exception is re-raised in the parent with the child's traceback.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A localhost TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
) -> None:
    # Two processes on a small machine: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    # Keep a launcher's torchrun variables from leaking into the explicit setup below.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from runtime.parallel.state import destroy_parallel, init_parallel

    try:
        init_parallel(
            world_size,
            rank=rank,
            backend="gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            timeout_s=120.0,
        )
        # Report before tearing down: the teardown makes peers fail too, and the parent
        # should see the root cause first.
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 — every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        destroy_parallel()


# Tracebacks of ranks that only failed because a peer went away.
_SECONDARY_FAILURE = ("Connection closed by peer", "Connection reset by peer")


def _failure_message(fn_name: str, world_size: int, failures: dict[int, str]) -> str:
    ranks = sorted(failures, key=lambda r: (any(s in failures[r] for s in _SECONDARY_FAILURE), r))
    first = ranks[0]
    msg = f"rank {first} of {world_size} failed in {fn_name}:\n{failures[first]}"
    for r in ranks[1:]:
        last_line = failures[r].strip().splitlines()[-1]
        msg += f"\n(rank {r} also failed: {last_line})"
    return msg


def run_distributed(
    fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 300.0
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned processes over gloo.

    Returns the ranks' return values in rank order. Raises RuntimeError carrying the
    first failing rank's traceback, or TimeoutError after `timeout` seconds.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"run_distributed({fn.__name__}): ranks {sorted(set(range(world_size)) - set(values))} "
                    f"did not finish within {timeout:.0f}s"
                )
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if r not in values and not p.is_alive() and p.exitcode not in (0, None)
                ]
                if dead and results.empty():
                    r = dead[0]
                    raise RuntimeError(
                        f"rank {r} of {fn.__name__} died with exit code {procs[r].exitcode} "
                        f"and no traceback (killed, or crashed in native code)"
                    ) from None
                continue
            if not ok:
                failures[rank] = payload
                # Give the other ranks a moment to report, so the root cause can be told
                # from peers that failed only because this rank went away.
                end = min(deadline, time.monotonic() + 3.0)
                while len(failures) + len(values) < world_size and time.monotonic() < end:
                    try:
                        r, ok2, p2 = results.get(timeout=max(0.05, end - time.monotonic()))
                    except queue.Empty:
                        break
                    (values if ok2 else failures)[r] = p2
                raise RuntimeError(_failure_message(fn.__name__, world_size, failures))
            values[rank] = payload
    finally:
        # After a failure the other ranks may block in a collective forever: stop them now.
        grace = 10.0 if len(values) == world_size else 0.0
        for p in procs:
            p.join(timeout=grace)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        results.close()
    return [values[r] for r in range(world_size)]
