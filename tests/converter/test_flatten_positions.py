"""flatten: HF code below the stack that numbers the step's tokens as "arange over the
token axis + the cache length" (Llama 4's temperature tuning) reads the per-token
``positions`` instead, threaded from the stack loop; any other read of the cache length
there stops the conversion with one line."""

from __future__ import annotations

import pytest

from converter.errors import ConversionError
from tests.converter.snippets import TINY, code_of, prepare

ANCHOR = "        v = v.view(shape).transpose(1, 2)\n"
PAST = "        past = cache.get_seq_length(0) if cache is not None else 0\n"
SCALE = "        q = q * (1.0 + positions.float()[None, None, :, None] / 100)\n"


def _tuned(*lines: str) -> str:
    assert ANCHOR in TINY
    return TINY.replace(ANCHOR, ANCHOR + "".join(lines))


def test_arange_plus_cache_length_reads_positions():
    idiom = "        positions = torch.arange(hidden_states.shape[1], device=q.device) + past\n"
    module, _ = prepare(_tuned(PAST, idiom, SCALE))
    attention = code_of(module, "TinyAttention")
    assert "positions = positions[0]" in attention
    assert "get_seq_length" not in attention and "past" not in attention
    assert "positions: torch.Tensor" in attention
    block = code_of(module, "TinyBlock")
    assert "positions: torch.Tensor" in block and "positions=positions" in block
    model = code_of(module, "TinyModel")
    assert "kv_cache=kv_caches[i], input_metadata=input_metadata, positions=positions" in model


def test_arange_from_cache_length_and_a_bound_token_count():
    lines = (
        PAST,
        "        bsz, q_len, _ = hidden_states.size()\n",
        "        positions = torch.arange(past, past + q_len)\n",
        SCALE,
    )
    module, _ = prepare(_tuned(*lines))
    assert "positions = positions[0]" in code_of(module, "TinyAttention")


def test_without_the_idiom_nothing_is_threaded():
    module, _ = prepare()
    assert "positions" not in code_of(module, "TinyBlock")
    assert "positions=positions" not in code_of(module, "TinyModel")


def test_a_branch_on_the_cache_length_stops():
    branch = "        if past == 0:\n            q = q * 2\n"
    with pytest.raises(ConversionError, match=r"branches on the KV cache's length"):
        prepare(_tuned(PAST, branch), through="flatten")


def test_another_use_of_the_cache_length_stops():
    offset = "        q = q + past\n"
    with pytest.raises(ConversionError, match=r"reads the KV cache's length \[`q = q \+ past`\]"):
        prepare(_tuned(PAST, offset), through="flatten")


def test_arange_over_another_axis_stops():
    idiom = "        positions = torch.arange(q.shape[2]) + past\n"
    with pytest.raises(ConversionError, match=r"`q.shape\[2\]`.*not the token axis"):
        prepare(_tuned(PAST, idiom, SCALE), through="flatten")


def test_a_positions_local_elsewhere_stops():
    lines = (
        PAST,
        "        positions = torch.arange(hidden_states.shape[1]) + past\n",
        "        positions = positions * 2\n",
        SCALE,
    )
    with pytest.raises(ConversionError, match="binds `positions`"):
        prepare(_tuned(*lines), through="flatten")
