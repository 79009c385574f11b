"""Stand-ins for `coverage_job.check`, run in the coverage runner's spawned workers:
one that succeeds, one that kills its worker, one that hangs where SIGALRM cannot reach
it. Top-level functions in an importable module, as spawn requires."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict

from hf2paged.verify.coverage_job import Outcome, mark_started


def fake_check(model_type: str, architecture: str, timeout: float, marker_dir: str | None) -> dict:
    mark_started(marker_dir, model_type)
    if model_type.startswith("crash"):
        os._exit(3)  # like a segfault: the worker dies without a result
    if model_type.startswith("hang"):
        # The soft timeout (SIGALRM) is blocked, as in a long native call: only the
        # parent's kill can stop this.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(120)
    time.sleep(0.5)
    return asdict(Outcome(model_type, converted=True, parity=True, max_diff=0.0, tolerance=1e-4))
