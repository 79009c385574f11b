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


def _side_branch_source() -> str:
    """TinyAttention with a constructor flag choosing a branch of forward that reads an
    input no paged caller passes (as cross-attention reads encoder states)."""
    source = TINY.replace(
        "    def __init__(self, config, layer_idx):\n        super().__init__()\n        self.config = config\n",
        "    def __init__(self, config, layer_idx, from_side=False):\n"
        "        super().__init__()\n        self.config = config\n"
        "        self.from_side = from_side\n"
        "        if self.from_side:\n"
        "            self.side_proj = nn.Linear(config.hidden_size, 2 * config.hidden_size)\n",
    )
    source = source.replace(
        "    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):\n"
        "        input_shape = hidden_states.shape[:-1]\n",
        "    def forward(self, hidden_states, attention_mask=None, cache=None, side_states=None, **kwargs):\n"
        "        input_shape = hidden_states.shape[:-1]\n",
    )
    source = source.replace(
        "        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)\n",
        "        if self.from_side:\n"
        "            q = self.qkv(hidden_states).chunk(3, dim=-1)[0]\n"
        "            k, v = self.side_proj(side_states).chunk(2, dim=-1)\n"
        "        else:\n"
        "            q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)\n",
    )
    assert source.count("side_states") == 2 and "self.side_proj = " in source
    return source


def test_a_branch_left_without_its_outputs_pins_its_flag():
    module, ctx = prepare(_side_branch_source())
    attn = code_of(module, "TinyAttention")
    # refused first in __init__, with why; the flag is a constant: both branches folded
    assert "if from_side:\n            raise ValueError(" in attn
    assert "only from_side=False converts" in attn and "k, v uncomputed" in attn
    assert "side_proj" not in attn and "if self.from_side" not in attn
    assert "q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)" in attn
    assert any("from_side=False" in line for line in ctx.log)


def test_a_branch_that_keeps_its_outputs_is_left_alone():
    # the same flag choosing between two complete computations stays a run-time choice
    source = _side_branch_source().replace(
        "            k, v = self.side_proj(side_states).chunk(2, dim=-1)\n",
        "            k, v = self.side_proj(hidden_states).chunk(2, dim=-1)\n",
    )
    attn = code_of(prepare(source)[0], "TinyAttention")
    assert "if self.from_side:" in attn and "raise ValueError" not in attn
