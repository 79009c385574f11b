"""attention: a chunk-local mask (transformers' ``create_chunked_causal_mask``, Llama 4's
"chunked_attention" layers) becomes ``attention_chunk_size`` on the layers it reaches;
one the pass cannot map stops the conversion in one line."""

import pytest

from converter.errors import ConversionError
from tests.converter.snippets import TINY, code_of, prepare

IMPORT = "from ...masking_utils import create_causal_mask\n"
STACK = (
    "        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, "
    "attention_mask=attention_mask)\n"
    "        hidden_states = inputs_embeds\n"
    "        for block in self.blocks:\n"
    "            hidden_states = block(hidden_states, mask, cache=cache, **kwargs)\n"
)
KWARGS = (
    "        mask_kwargs = {'config': self.config, 'inputs_embeds': inputs_embeds, "
    "'attention_mask': attention_mask}\n"
)
# Llama 4's: a table of builders filled into the mapping, indexed by config.layer_types[i]
LLAMA4 = (
    KWARGS + "        mask_functions = {\n"
    '            "full_attention": lambda: create_causal_mask(**mask_kwargs),\n'
    '            "chunked_attention": lambda: create_chunked_causal_mask(**mask_kwargs),\n'
    "        }\n"
    "        mapping = {}\n"
    "        for layer_type in set(self.config.layer_types):\n"
    "            mapping[layer_type] = mask_functions[layer_type]()\n"
    "        hidden_states = inputs_embeds\n"
    "        for i, block in enumerate(self.blocks[: self.config.num_hidden_layers]):\n"
    "            hidden_states = block(hidden_states, mapping[self.config.layer_types[i]], "
    "cache=cache, **kwargs)\n"
)
# the sliding-window models' shape: a dict of masks, indexed by the layer's attention_type
BY_ATTRIBUTE = (
    KWARGS + "        mapping = {\n"
    '            "full_attention": create_causal_mask(**mask_kwargs),\n'
    '            "chunked_attention": create_chunked_causal_mask(**mask_kwargs),\n'
    "        }\n"
    "        hidden_states = inputs_embeds\n"
    "        for block in self.blocks:\n"
    "            hidden_states = block(hidden_states, mapping[block.attention_type], "
    "cache=cache, **kwargs)\n"
)
EXPECTED = (
    "attention_chunk_size=(config.attention_chunk_size if config.layer_types[layer_idx] == "
    '"chunked_attention" else None)'
)


def chunked_source(stack: str) -> str:
    source = TINY.replace(IMPORT, IMPORT.replace("\n", ", create_chunked_causal_mask\n"))
    source = source.replace(
        "        self.attn_core = TinyAttention(config, layer_idx)\n",
        "        self.attention_type = config.layer_types[layer_idx]\n"
        "        self.attn_core = TinyAttention(config, layer_idx)\n",
    )
    assert STACK in source
    return source.replace(STACK, stack)


def line_of(source: str, text: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if text in line)


@pytest.mark.parametrize("stack", [LLAMA4, BY_ATTRIBUTE], ids=["layer_types[i]", "attribute"])
def test_chunked_layers_get_the_chunk_size(stack):
    module, ctx = prepare(chunked_source(stack))  # through prune
    attn = code_of(module, "TinyAttention")
    assert EXPECTED in attn
    # the mask itself is gone: the kernel applies the chunk limit
    assert "create_chunked_causal_mask(" not in module.code
    assert "mask_functions" not in module.code and "mapping[" not in module.code


def test_models_without_a_chunked_mask_are_unchanged():
    plain, _ = prepare(TINY)
    assert "attention_chunk_size" not in plain.code


def test_layers_not_reached_by_the_chunked_mask_keep_none():
    # the attention masks with None: HF applies no mask there, nor does the kernel
    source = chunked_source(LLAMA4).replace(
        "self, q, k, v, attention_mask, dropout=0.0", "self, q, k, v, None, dropout=0.0"
    )
    module, _ = prepare(source, through="attention")
    assert "attention_chunk_size" not in code_of(module, "TinyAttention")


@pytest.mark.parametrize(
    "stack, change, where, what",
    [
        # one chunked mask for every layer: not keyed by layer type
        (
            STACK.replace("create_causal_mask(", "create_chunked_causal_mask("),
            None,
            "mask = create_chunked_causal_mask(",
            "is not stored in a mapping keyed by layer type",
        ),
        # the mapping picked by something other than the layer's own type
        (
            LLAMA4.replace("mapping[self.config.layer_types[i]]", "mapping[self.pick(i)]"),
            None,
            "hidden_states = block(",
            "is picked by `mapping[self.pick(i)]`, not by the layer's own type",
        ),
        # the stack skips its first layer: position i is not the layer index
        (
            LLAMA4.replace("self.blocks[: self.config.num_hidden_layers]", "self.blocks[1:]"),
            None,
            "hidden_states = block(",
            "not by the layer's own type",
        ),
        # the whole mapping handed down
        (
            LLAMA4.replace("mapping[self.config.layer_types[i]]", "mapping"),
            None,
            "hidden_states = block(",
            "is passed whole, not per layer type",
        ),
        # the attention does not know its layer index
        (
            LLAMA4,
            ("TinyAttention(config, layer_idx)", "TinyAttention(config, 0)"),
            "self.attn_core = TinyAttention(config, 0)",
            "which is built without the layer index",
        ),
    ],
    ids=["unkeyed", "other-index", "offset-stack", "whole-mapping", "no-layer-index"],
)
def test_unmappable_chunked_masks_stop(stack, change, where, what):
    source = chunked_source(stack)
    if change is not None:
        source = source.replace(*change)
    with pytest.raises(ConversionError) as err:
        prepare(source, through="attention")
    text = str(err.value)
    assert len(text.splitlines()) == 1
    assert f"modeling_tiny.py:{line_of(source, where)}:" in text
    assert "chunked attention mask (create_chunked_causal_mask)" in text
    assert what in text
    assert "converter/passes/attention/chunked.py" in text
