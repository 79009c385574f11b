"""ALiBi parity must be able to fail: without the slopes, or with the slopes of another
head order (MPT's non-power-of-2 [1::2] + [::2] order, Bloom's extra slopes), the
generated Bloom/MPT logits must leave the tolerance by far."""

from __future__ import annotations

import pytest
from harness import ATOL, generated_records, report

from runtime.attention import attention_layers


@pytest.mark.parametrize("arch", ["bloom", "mpt"])
@pytest.mark.parametrize("change", ["off", "reversed"])
def test_alibi_slopes_matter(cases, arch, change):
    case = cases(arch)

    def tweak(model):
        for layer in attention_layers(model):
            assert layer.alibi_slopes is not None and layer.alibi_slopes.numel() == 6
            if change == "off":
                layer.alibi_slopes = None
            else:
                layer.alibi_slopes = layer.alibi_slopes.flip(0)

    result = report(case, generated_records(case, tweak=tweak))
    print(f"{arch} with ALiBi slopes {change}:", result.format())
    assert result.max_diff > 100 * ATOL
