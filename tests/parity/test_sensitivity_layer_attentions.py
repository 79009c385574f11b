"""LongCat-Flash's parity check can fail where its conversion could go wrong.

- Two attentions per decoder layer, each with its own KV cache (the source's index
  ``layer_idx * 2 + i``): with both of a layer's attentions on one cache (what a
  conversion that gave each decoder layer one cache would do), the second overwrites the
  first's keys and values, so decode steps and chunked prefills, which read the cache,
  miss. (Swapping two attentions' indices would only relabel the caches: every step
  writes and reads through the same index, so it cannot fail and is not a check.)
- Zero-computation experts (FusedMoE ``identity_experts``): pairs routed to them dropped
  instead of adding ``w * x`` miss everywhere.

Each case builds the COMMITTED module from coverage's tiny checkpoint (the one
test_parity_shipped.py checks at parity) and must miss HF's reference far beyond the
tolerance.
"""

from __future__ import annotations

import torch

from hf2paged.verify.coverage_job import scenario
from hf2paged.verify.parity import compare, run_generated
from runtime.engine.build_model import build_model
from runtime.moe import FusedMoE


def _result(case, model):
    return compare(case.module, run_generated(model, case.tokens, scenario()), case.reference)


def test_the_model_is_at_parity_with_a_cache_per_attention(tiny_cases):
    case = tiny_cases("longcat_flash", "longcat_flash")
    model = build_model(case.model_dir)
    indices = [[a.attn.kv_cache_index for a in layer.self_attn] for layer in model.model.layers]
    assert indices == [[0, 1], [2, 3]]  # layer_idx * 2 + i, the source's own
    assert _result(case, model).max_diff <= case.tolerance


def test_one_cache_per_decoder_layer_misses(tiny_cases):
    case = tiny_cases("longcat_flash", "longcat_flash")
    model = build_model(case.model_dir)
    for i, layer in enumerate(model.model.layers):
        for attention in layer.self_attn:
            attention.attn.kv_cache_index = i
    result = _result(case, model)
    print("one cache per layer:", result.format())
    assert result.prefill <= case.tolerance  # each attention reads what it just wrote
    assert max(result.decode) > 10 * case.tolerance, result.format()
    assert result.chunked > 10 * case.tolerance, result.format()


def test_dropping_the_zero_experts_misses(tiny_cases):
    case = tiny_cases("longcat_flash", "longcat_flash")
    model = build_model(case.model_dir)
    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert layers and all(m.identity_experts == 4 for m in layers)  # rules/coverage.toml

    def routed_only(layer: FusedMoE):
        forward = layer.forward

        def drop(hidden, index, weights):
            zero = index >= layer.num_experts
            return forward(hidden, index.masked_fill(zero, 0), weights.masked_fill(zero, 0))

        return drop

    for layer in layers:
        layer.forward = routed_only(layer)
    with torch.no_grad():
        result = _result(case, model)
    print("zero experts dropped:", result.format())
    assert result.max_diff > 10 * case.tolerance, result.format()
