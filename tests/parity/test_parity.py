"""Logit parity, TP=1 and TP=2 (gloo), for every architecture of the issue.

float32, atol 1e-4, against HF eager: a mixed-length flattened prefill (every
position), 8 decode steps through the paged cache, and a chunked prefill batched with
decodes. The TP=2 run spawns one gloo group for all architectures (spawning costs
seconds; the models are tiny).
"""

from __future__ import annotations

import pytest
from configs import ARCHS, TP2_SKIP
from distributed import run_distributed
from harness import ATOL, from_worker, generated_records, report, tp_worker


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_tp1(cases, arch):
    case = cases(arch)
    result = report(case, generated_records(case))
    print(result.format())
    assert len(result.decode) == 8
    assert result.max_diff < ATOL, result.format()


def test_parity_tp2(all_cases):
    all_cases = {a: c for a, c in all_cases.items() if a not in TP2_SKIP}
    jobs = [(a, str(c.model_dir), c.tokens) for a, c in all_cases.items()]
    records = run_distributed(tp_worker, 2, jobs, timeout=600)[0]
    failures = []
    for arch, case in all_cases.items():
        result = report(case, from_worker(records[arch]))
        print("TP=2", result.format())
        if result.max_diff >= ATOL:
            failures.append(result.format())
    assert not failures, "\n".join(failures)
