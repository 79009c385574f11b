"""GPT-Neo's local layers mask through a banded buffer that the converter turns into
a sliding window: without it, the logits must leave the tolerance by far (the prompts
are longer than the window of 4)."""

from __future__ import annotations

from harness import ATOL, generated_records, report

from runtime.attention import attention_layers


def test_gpt_neo_local_window_matters(cases):
    case = cases("gpt_neo")

    def no_window(model):
        windows = [layer.sliding_window for layer in attention_layers(model)]
        assert windows == [None, 4]  # global, local
        for layer in attention_layers(model):
            layer.sliding_window = None

    result = report(case, generated_records(case, tweak=no_window))
    print("gpt_neo without its local window:", result.format())
    assert result.max_diff > 100 * ATOL
