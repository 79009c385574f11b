"""Logit parity of every shipped architecture the hand-configured suite (configs.py)
does not cover: the long tail `hf2paged coverage` finds at parity, committed to
generated/ (rules/architectures.toml).

Each case is the coverage's own (hf2paged/verify/coverage_job.py): the config class's
defaults shrunk by rules/coverage.toml [tiny] (2 layers, hidden 64, 4 heads / 2 KV heads,
sliding windows of 4, per-type quirks), every HF parameter perturbed, saved with
`save_pretrained`; the COMMITTED module is built from that checkpoint through the
registry (`build_model`), and its logits compared with HF eager on a 3-prompt prefill,
3 decode steps through the paged cache and a chunked prefill mixed with decodes;
tolerance 1e-4 x max(1, max |HF logit|), as coverage. TP=1 per architecture; TP=2 runs
every one in a single gloo group (one spawn).
"""

from __future__ import annotations

import pytest
import torch
from configs import CONFIGS
from distributed import run_distributed

import generated
from converter.convert import architectures
from hf2paged.verify.coverage_job import scenario
from hf2paged.verify.coverage_rules import load_coverage_rules
from hf2paged.verify.parity import compare, run_generated
from runtime.engine.build_model import build_model


def _causal_lm_names() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _module_of(model_type: str) -> str | None:
    """The generated module serving `model_type`'s causal-LM class (None: not shipped)."""
    entry = generated._MODELS.get(_causal_lm_names().get(model_type, ""))
    return entry[0] if entry else None


def checked_types() -> list[str]:
    """The model types coverage converts and checks (its in-scope buckets: dense
    decoder-only and mixture-of-experts)."""
    buckets = load_coverage_rules()["buckets"].values()
    return [t for b in buckets if b.get("scope") == "in" for t in b["types"]]


def long_tail() -> dict[str, str]:
    """{generated module: the coverage model type whose tiny config tests it} for every
    module rules/architectures.toml ships that no configs.py case reaches."""
    covered = {_module_of(spec.get("model_type", case)) for case, spec in CONFIGS.items()}
    shipped = set(architectures())
    out: dict[str, str] = {}
    for model_type in checked_types():
        module = _module_of(model_type)
        if module in shipped and module not in covered:
            # a type named after its module first (gemma3 -> gemma3_text otherwise)
            if module not in out or model_type.replace("-", "_") == module:
                out[module] = model_type
    return dict(sorted(out.items()))


LONG_TAIL = long_tail()

# Modules the TP=2 run leaves out, with the reason (an open problem, not a pass).
TP2_SKIP: dict[str, str] = {}


@pytest.fixture(scope="session")
def shipped_cases(tiny_cases):
    """module -> the tiny case of the coverage type that tests it."""
    return lambda module: tiny_cases(LONG_TAIL[module], module)


def test_the_long_tail_is_what_coverage_passes():
    """Every dense type is served by a shipped module (cpmant aside: it fails parity),
    and the committed registry lists every module rules/architectures.toml ships."""
    dense = load_coverage_rules()["buckets"]["dense"]["types"]
    unserved = sorted(t for t in dense if _module_of(t) is None)
    assert unserved == ["cpmant"], unserved
    assert {m for m, _ in generated._MODELS.values()} == set(architectures())
    assert len(LONG_TAIL) >= 30


@pytest.mark.parametrize("module", list(LONG_TAIL))
def test_shipped_parity_tp1(shipped_cases, module):
    case = shipped_cases(module)
    model = build_model(case.model_dir)
    assert type(model).__module__ == f"generated.{module}"
    result = compare(module, run_generated(model, case.tokens, scenario()), case.reference)
    print(result.format())
    assert result.max_diff <= case.tolerance, result.format()


def test_a_broken_model_fails_the_check(shipped_cases):
    """The check can fail: one norm weight scaled in a shipped long-tail model."""
    case = shipped_cases("olmo2")
    model = build_model(case.model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    result = compare("olmo2", run_generated(model, case.tokens, scenario()), case.reference)
    assert result.max_diff > 100 * case.tolerance, result.format()


def _tp_worker(rank: int, world_size: int, jobs: list[tuple[str, str, list[list[int]]]]):
    out = {}
    for module, model_dir, tokens in jobs:
        model = build_model(model_dir, tp=world_size)
        records = run_generated(model, tokens, scenario())
        for r in records:
            r.logits = r.logits.numpy()  # numpy pickles by value (see harness.tp_worker)
        out[module] = records
    return out if rank == 0 else None


def test_shipped_parity_tp2(shipped_cases):
    cases = [shipped_cases(m) for m in LONG_TAIL if m not in TP2_SKIP]
    jobs = [(c.module, str(c.model_dir), c.tokens) for c in cases]
    records = run_distributed(_tp_worker, 2, jobs, timeout=900)[0]
    failures = []
    for case in cases:
        for r in records[case.module]:
            r.logits = torch.from_numpy(r.logits)
        result = compare(case.module, records[case.module], case.reference)
        print("TP=2", result.format())
        if result.max_diff > case.tolerance:
            failures.append(result.format())
    assert not failures, "\n".join(failures)
