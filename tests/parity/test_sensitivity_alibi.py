"""ALiBi parity must be able to fail: without the slopes, or with the slopes of another
head order (MPT's non-power-of-2 [1::2] + [::2] order, Bloom's extra slopes), the
generated Bloom/MPT logits must leave the tolerance by far."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from harness import ATOL, generated_records, report

from runtime.attention import attention_layers


@pytest.mark.parametrize("arch", ["bloom", "mpt"])
@pytest.mark.parametrize("change", ["off", "reversed"])
def test_alibi_slopes_matter(cases, arch, change):
    case = cases(arch)

    def tweak(model):
        for layer in attention_layers(model):
            assert layer.alibi is not None and layer.alibi.slopes.numel() == 6
            if change == "off":
                layer.alibi = None
            else:
                layer.alibi = replace(layer.alibi, slopes=layer.alibi.slopes.flip(0))

    result = report(case, generated_records(case, tweak=tweak))
    print(f"{arch} with ALiBi slopes {change}:", result.format())
    assert result.max_diff > 100 * ATOL


@pytest.mark.parametrize("change", ["off", "doubled", "unrounded"])
def test_falcon_alibi_slopes_matter(cases, change):
    # "doubled": what transformers' eager Falcon path computes (its own bias plus the one
    # folded into the mask); the generated model must follow the sdpa path, not that.
    case = cases("falcon_alibi")

    def tweak(model):
        for layer in attention_layers(model):
            alibi = layer.alibi
            assert alibi is not None and alibi.slopes.numel() == 16
            # slope * position rounded as Falcon's builder does, then scaled by 1/sqrt(d)
            assert alibi.dtype == torch.bfloat16 and alibi.scale == layer.scale != 1.0
            if change == "unrounded":  # slope * (j - i) in fp32, not Falcon's bf16 products
                layer.alibi = replace(alibi, dtype=torch.float32)
            elif change == "off":
                layer.alibi = None
            else:
                layer.alibi = replace(alibi, slopes=alibi.slopes * 2)

    result = report(case, generated_records(case, tweak=tweak))
    print(f"falcon_alibi with ALiBi slopes {change}:", result.format())
    # unrounded: a small bias error (bf16 steps of slope * j, j < 25 here) still 10x over
    assert result.max_diff > (10 if change == "unrounded" else 100) * ATOL


def test_falcon_grouped_layout_matters(cases):
    # K/V heads read from the other group of the fused [kv][q, q, k, v][D] rows
    case = cases("falcon")

    def tweak(model):
        # the K/V broadcast over each query group is cached once per group: 2 heads, not 4
        assert [layer.num_kv_heads for layer in attention_layers(model)] == [2, 2]
        for block in model.transformer.h:
            weight = block.self_attention.query_key_value.weight.data  # [2 * 4 * D, hidden]
            groups = weight.view(2, 4, -1, weight.shape[-1])  # [group, q q k v, D, hidden]
            kv = groups[:, 2:].clone()
            groups[:, 2:] = kv.flip(0)

    result = report(case, generated_records(case, tweak=tweak))
    print("falcon with K/V from the other group:", result.format())
    assert result.max_diff > 100 * ATOL
