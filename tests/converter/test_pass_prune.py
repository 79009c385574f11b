"""prune: dataflow removal of masks/caches/flags, call binding, and failing loudly."""

import pytest

from converter.errors import ConversionError
from tests.converter.snippets import TINY, code_of, prepare


def test_plumbing_falls_away():
    module, ctx = prepare()
    model = code_of(module, "TinyModel")
    assert (
        "create_causal_mask" not in model and "mask" not in model
    )  # unused once attention is paged
    assert "inputs_embeds = self.wte(input_ids)" in model  # `if inputs_embeds is None` inlined
    block = code_of(module, "TinyBlock")
    assert "use_cache" not in block and "cache" not in block.replace("kv_cache", "")
    # the positional mask argument was bound to its parameter, then dropped with it
    assert "hidden_states = block(hidden_states, kv_cache=kv_caches[i]" in model
    attn = code_of(module, "TinyAttention")
    assert "def forward(self, hidden_states, *, kv_cache" in attn and "update" not in attn
    lm = code_of(module, "TinyForCausalLM")
    assert "labels" not in lm and "loss" not in lm
    assert "eager_attention_forward" not in module.code  # unreferenced helper shaken off
    assert ctx.removed_params["TinyBlock.forward"] == ["attention_mask", "cache", "use_cache"]


def test_deterministic():
    assert prepare()[0].code == prepare()[0].code


def test_hidden_chain_deletion_fails_loudly():
    # OPT round 1: a value derived from the removed mask feeds the hidden states
    source = TINY.replace(
        "        hidden_states = inputs_embeds\n",
        "        pos = torch.cumsum(attention_mask, dim=1)\n        hidden_states = inputs_embeds + pos\n",
    )
    with pytest.raises(
        ConversionError, match="delete the statement computing \\['hidden_states'\\]"
    ) as err:
        prepare(source)
    message = str(err.value)
    assert "modeling_tiny.py:" in message and "hidden_states = inputs_embeds + pos" in message


def test_emptied_loop_fails_loudly():
    source = TINY.replace(
        "            hidden_states = block(hidden_states, mask, cache=cache, **kwargs)",
        "            hidden_states = block(hidden_states, mask, cache=cache, **kwargs)\n"
        "            hidden_states = hidden_states + cache.offset",
    )
    with pytest.raises(ConversionError, match="delete the statement computing"):
        prepare(source)


def test_names_bound_by_try_and_local_imports_stay_alive():
    source = TINY.replace(
        "        residual = hidden_states\n        hidden_states, _ = self.attn_core(",
        "        import math\n"
        "        try:\n            scale = math.sqrt(2.0)\n        except ValueError:\n            scale = 1.0\n"
        "        residual = hidden_states * scale\n        hidden_states, _ = self.attn_core(",
    )
    block = code_of(prepare(source)[0], "TinyBlock")
    assert "residual = hidden_states * scale" in block and "import math" in block


def test_an_argument_that_may_be_none_keeps_the_callees_none_check():
    # granite_swa's NoPE layers: `pe = table[k] if k else None` passed on; the callee's
    # `if pe is not None:` must survive (only a plain unknown name is assumed set)
    source = TINY.replace(
        "    def forward(self, hidden_states, attention_mask=None, cache=None, use_cache=False, **kwargs):\n"
        "        residual = hidden_states\n",
        "    def forward(self, hidden_states, attention_mask=None, cache=None, use_cache=False, odd_extra=None, **kwargs):\n"
        "        residual = hidden_states\n"
        "        if odd_extra is not None:\n"
        "            hidden_states = hidden_states * odd_extra\n",
    ).replace(
        "            hidden_states = block(hidden_states, mask, cache=cache, **kwargs)",
        "            odd = hidden_states.mean() if input_ids.shape[0] > 1 else None\n"
        "            hidden_states = block(hidden_states, mask, cache=cache, odd_extra=odd, **kwargs)",
    )
    block = code_of(prepare(source)[0], "TinyBlock")
    assert "if odd_extra is not None:" in block
