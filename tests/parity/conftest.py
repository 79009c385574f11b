"""Session fixtures: one tiny checkpoint + HF reference per architecture, shared by
the TP=1, TP=2 and sensitivity tests (`cases`: the hand-written configs.py ones;
`tiny_cases`: coverage's shrunk config-class defaults, for the shipped long tail)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from configs import ARCHS
from harness import make_case

from hf2paged.verify.coverage_config import tiny_config
from hf2paged.verify.coverage_job import ATOL, hf_case
from hf2paged.verify.coverage_rules import load_coverage_rules


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


@dataclass
class ShippedCase:
    module: str  # the generated module that serves it
    model_type: str
    model_dir: Path
    tokens: list[list[int]]
    reference: list[torch.Tensor]

    @property
    def tolerance(self) -> float:
        return ATOL * max(1.0, max(float(r.abs().max()) for r in self.reference))


@pytest.fixture(scope="session")
def tiny_cases(tmp_path_factory):
    """`get(model_type, module, fused=False)`: coverage's case of `model_type` (hf2paged/verify/
    coverage_job.py: the config class's defaults shrunk by rules/coverage.toml [tiny],
    every HF parameter and persistent buffer perturbed, saved with `save_pretrained`)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = tmp_path_factory.mktemp("shipped")
    rules = load_coverage_rules()
    built: dict[str, ShippedCase] = {}

    def get(model_type: str, module: str, fused: bool = False) -> ShippedCase:
        key = f"{model_type}-fused" if fused else model_type
        if key not in built:
            hf_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
            config = tiny_config(model_type, hf_cls.config_class, rules)
            # fused: transformers' own layout (fused 3-D experts) instead of the
            # checkpoint's original one (one tensor per expert, for most MoE families)
            save = {"save_original_format": False} if fused else {}
            tokens, reference = hf_case(hf_cls, config, root / key, **save)
            built[key] = ShippedCase(module, model_type, root / key, tokens, reference)
        return built[key]

    return get
