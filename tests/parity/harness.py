"""Parity harness: HF eager reference vs the generated model (see hf2paged/verify/parity.py).

`make_case` builds a tiny random HF model, saves it with `save_pretrained` and records
its logits on the scenario's sequences; `generated_records` loads the generated model
from that checkpoint (strict `load_weights` over `runtime.loader.iter_weights`) and
drives it through the paged runtime. `tp_worker` does the same on each rank of a gloo
group (tests/distributed.py), for several architectures per spawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from configs import CONFIGS
from transformers import AutoConfig, AutoModelForCausalLM

from hf2paged.verify.parity import Scenario, compare, hf_reference, run_generated
from runtime.engine.build_model import build_model

ATOL = 1e-4
SCENARIO = Scenario()


@dataclass
class Case:
    arch: str
    model_dir: Path
    tokens: list[list[int]]
    reference: list[torch.Tensor]  # HF logits [len, vocab] per sequence


def make_case(arch: str, root: Path) -> Case:
    kwargs = dict(CONFIGS[arch])
    impl = kwargs.pop("attn_implementation", "eager")
    randomize = set(kwargs.pop("random_params", ()))
    config = AutoConfig.for_model(kwargs.pop("model_type", arch), **kwargs)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.rsplit(".", 1)[-1] in randomize:
                param.normal_()
    model_dir = root / arch
    hf.save_pretrained(model_dir)
    tokens = SCENARIO.tokens(config.vocab_size)
    return Case(arch, model_dir, tokens, hf_reference(hf, tokens))


def generated_records(case: Case, tweak=None):
    model = build_model(case.model_dir)
    if tweak is not None:
        tweak(model)
    return run_generated(model, case.tokens, SCENARIO)


def report(case: Case, records):
    return compare(case.arch, records, case.reference)


def tp_worker(rank: int, world_size: int, jobs: list[tuple[str, str, list[list[int]]]]):
    """Every (arch, model_dir, tokens) job on this rank; rank 0 returns the records."""
    out = {}
    for arch, model_dir, tokens in jobs:
        model = build_model(model_dir, tp=world_size)
        records = run_generated(model, tokens, SCENARIO)
        # numpy pickles by value; torch tensors would go through shared-memory file
        # descriptors that die with this process.
        for r in records:
            r.logits = r.logits.numpy()
        out[arch] = records
    return out if rank == 0 else None


def from_worker(records):
    for r in records:
        r.logits = torch.from_numpy(r.logits)
    return records
