"""Run coverage checks in parallel worker processes; no architecture can stop the others.

A `ProcessPoolExecutor` (spawn context: no inherited torch/threads state) runs
`coverage_job.check`. Each job has a soft timeout inside the worker (SIGALRM); a job
stuck in native code past `timeout + GRACE` gets its worker killed by pid (each job
writes its pid to a marker file when it starts). A worker that dies (killed, segfault,
out of memory) breaks the whole pool: the jobs it had not started are resubmitted,
and those that were running are retried one at a time, so the one that kills its
worker is identified and reported as a crash instead of taking others down with it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from hf2paged.verify.coverage_job import Outcome, check, init_worker

GRACE = 30.0  # seconds past the soft timeout before the worker is killed


def run_jobs(
    jobs: list[tuple[str, str]],
    workers: int,
    timeout: float,
    on_done: Callable[[Outcome], None] | None = None,
    fn: Callable[..., dict] = check,
    initializer: Callable[[], None] | None = init_worker,
    grace: float = GRACE,
) -> dict[str, Outcome]:
    """`fn(model type, architecture, timeout, marker dir)` (an Outcome as a dict) for
    every job, in worker processes; {model type: Outcome}."""
    results: dict[str, Outcome] = {}

    def finish(outcome: Outcome) -> None:
        results[outcome.model_type] = outcome
        if on_done:
            on_done(outcome)

    queue, suspects = list(jobs), []
    task = (fn, initializer, timeout, grace)
    with tempfile.TemporaryDirectory(prefix="hf2paged-cov-markers-") as markers:
        while queue or suspects:
            # Suspects (running when a worker died) go alone, so a crash names its job.
            alone = not queue
            if alone:
                batch, suspects = suspects, []
            else:
                batch, queue = queue, []
            leftover, running = _round(batch, 1 if alone else workers, task, Path(markers), finish)
            if len(leftover) == len(batch):  # nothing even started: workers cannot start
                for job in leftover:
                    finish(
                        Outcome(job[0], stage="crash", reason="worker processes failed to start")
                    )
                leftover = []
            queue.extend(leftover)
            for job in running:
                if alone:
                    finish(
                        Outcome(
                            job[0],
                            stage="crash",
                            reason="the worker process died (segfault, abort or out of memory)",
                        )
                    )
                else:
                    suspects.append(job)
    return results


def _round(batch, workers, task, markers: Path, finish):
    """One pool over `batch`. Returns (jobs never started, jobs running when the pool
    broke); killed-for-timeout jobs are finished here."""
    fn, initializer, timeout, grace = task
    killed: set[str] = set()
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=max(1, min(workers, len(batch))), mp_context=ctx, initializer=initializer
    )
    futures = {pool.submit(fn, t, arch, timeout, str(markers)): (t, arch) for t, arch in batch}
    broken: list[tuple[str, str]] = []
    try:
        while futures:
            done, _ = wait(futures, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                job = futures.pop(future)
                try:
                    outcome = Outcome(**future.result())
                except BrokenProcessPool:
                    broken.append(job)  # its marker says below whether it had started
                    continue
                (markers / job[0]).unlink(missing_ok=True)
                finish(outcome)
            _kill_overdue(markers, futures.values(), timeout + grace, killed)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    leftover, running = [], []
    for job in broken:
        if job[0] in killed:
            finish(
                Outcome(
                    job[0],
                    stage="timeout",
                    reason=f"no result after {timeout + grace:g} s: stuck in native code, worker killed",
                )
            )
        elif job[0] in _started(markers):
            running.append(job)
        else:
            leftover.append(job)
        (markers / job[0]).unlink(missing_ok=True)
    return leftover, running


def _started(markers: Path) -> set[str]:
    return {p.name for p in markers.iterdir()}


def _kill_overdue(markers: Path, jobs, limit: float, killed: set[str]) -> None:
    now = time.time()
    for model_type, _ in jobs:
        marker = markers / model_type
        try:
            started, pid = marker.stat().st_mtime, int(marker.read_text())
        except (FileNotFoundError, ValueError):
            continue
        if model_type not in killed and now - started > limit:
            killed.add(model_type)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
