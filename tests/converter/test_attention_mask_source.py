"""attention: the paged call drops the interface's mask — only the model's incoming one."""

import pytest

from converter.errors import ConversionError
from tests.converter.snippets import TINY, code_of, prepare

CALL = "            self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs\n"
INTERFACE = "        attention_interface: Callable = "


def _with_mask(lines: str, mask: str) -> str:
    """TINY with `lines` before the interface lookup and `mask` passed to the call."""
    source = TINY.replace(INTERFACE, lines + INTERFACE)
    return source.replace(CALL, CALL.replace("attention_mask,", f"{mask},"))


def _line_of(source: str, text: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if text in line)


@pytest.mark.parametrize(
    "lines, mask, where",
    [
        # Doge: a dynamic mask from the value states, combined with the incoming mask
        (
            "        dt = torch.exp(self.out.weight[0, 0] * v.sum(-1))\n"
            "        attn_mask = attention_mask + dt[:, :, :, None].transpose(-1, -2)\n",
            "attn_mask",
            "attn_mask = attention_mask + dt",
        ),
        # from the hidden states, inline in the call
        (
            "",
            "attention_mask * hidden_states.mean()",
            "attn_output, attn_weights = attention_interface(",
        ),
    ],
)
def test_mask_computed_in_the_layer_is_refused(lines, mask, where):
    source = _with_mask(lines, mask)
    with pytest.raises(ConversionError) as err:
        prepare(source, through="attention")
    text = str(err.value)
    assert f"modeling_tiny.py:{_line_of(source, where)}:" in text
    assert "attention masks computed inside the layer (e.g. Doge's dynamic mask)" in text
    assert "not supported by paged attention" in text
    assert len(text.splitlines()) == 1


@pytest.mark.parametrize(
    "lines, mask",
    [
        ("", "attention_mask"),
        # sliced to the keys' length, cast to the queries' dtype: still the incoming mask
        (
            "        causal_mask = attention_mask[:, :, :, : k.shape[-2]].to(q.dtype)\n"
            "        causal_mask = causal_mask.type_as(q)\n",
            "causal_mask",
        ),
        ("", "None"),
    ],
)
def test_incoming_mask_is_dropped(lines, mask):
    module, _ = prepare(_with_mask(lines, mask), through="attention")
    attn = code_of(module, "TinyAttention")
    assert "attn_output = self.attn(" in attn
    assert "kv_cache, input_metadata)" in attn
