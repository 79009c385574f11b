"""Llama 4's parity check can fail: its tiny config (rules/coverage.toml [tiny.types.llama4])
makes each of its features bite on the coverage scenario, so a generated module that
dropped one would miss. Each case builds the COMMITTED module from coverage's tiny
checkpoint (the one test_parity_shipped.py checks at parity) with one option flipped in
its config, and the logits must move far beyond the parity tolerance against HF's
reference of the unflipped model:

- attention_chunk_size 4 -> 8192: the chunk-local mask of the RoPE layers as plain causal;
- attn_temperature_tuning off: the NoPE layer's query scaling by position dropped;
- floor_scale 2 -> 8192: the scaling computed at the wrong positions' scale;
- num_experts_per_tok 2 -> 1: the top-k read back from the router's dense scores.
"""

from __future__ import annotations

import pytest

from hf2paged.verify.coverage_job import scenario
from hf2paged.verify.parity import compare, run_generated
from runtime.engine.build_model import build_model
from runtime.loader import load_config

CASES = {
    "attention_chunk_size": 8192,
    "attn_temperature_tuning": False,
    "floor_scale": 8192,
    "num_experts_per_tok": 1,
}


@pytest.mark.parametrize("field, value", list(CASES.items()), ids=list(CASES))
def test_a_flipped_llama4_option_misses(tiny_cases, field, value):
    case = tiny_cases("llama4", "llama4")
    config = load_config(case.model_dir)
    assert getattr(config, field) != value, f"{field} is already {value}"
    setattr(config, field, value)
    model = build_model(case.model_dir, config=config)
    assert type(model).__module__ == "generated.llama4"
    result = compare("llama4", run_generated(model, case.tokens, scenario()), case.reference)
    print(f"llama4 with {field}={value}:", result.format())
    assert result.max_diff > 10 * case.tolerance, result.format()
