"""Session fixture: one tiny checkpoint + HF reference per architecture, shared by
the TP=1, TP=2 and sensitivity tests."""

from __future__ import annotations

import pytest
from configs import ARCHS
from harness import make_case


@pytest.fixture(scope="session")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = make_case(arch, root)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def all_cases(cases):
    return {arch: cases(arch) for arch in ARCHS}
