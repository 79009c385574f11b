"""flatten: paged entry points, kv threading through the ownership graph, the stack loop."""

import pytest

from converter.errors import ConversionError
from tests.converter.snippets import TINY, code_of, prepare


def test_entry_points_and_threading():
    module, _ = prepare(through="flatten")
    lm = code_of(module, "TinyForCausalLM")
    assert "def forward(\n        self,\n        input_ids: torch.Tensor," in lm
    assert (
        "hidden_states = self.backbone(\n            input_ids=input_ids[None], positions=positions[None]"
        in lm
    )
    assert "return hidden_states[0]" in lm
    assert (
        "def compute_logits(self, hidden_states: torch.Tensor, input_metadata: InputMetadata)" in lm
    )
    assert "hidden_states = hidden_states[input_metadata.logits_indices]" in lm
    assert "logits = self.head(hidden_states)" in lm  # `outputs.last_hidden_state` rewired
    model = code_of(module, "TinyModel")
    assert "def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches" in model
    assert "for i, block in enumerate(self.blocks):" in model
    assert "kv_cache=kv_caches[i], input_metadata=input_metadata" in model
    block = code_of(module, "TinyBlock")
    assert "*, kv_cache: torch.Tensor, input_metadata: InputMetadata" in block
    assert "kv_cache=kv_cache, input_metadata=input_metadata" in block


def test_existing_enumerate_index_is_reused():
    source = TINY.replace(
        "for block in self.blocks:", "for idx, block in enumerate(self.blocks[:2]):"
    )
    module, _ = prepare(source, through="flatten")
    assert "kv_cache=kv_caches[idx]" in code_of(module, "TinyModel")


def test_two_stack_loops_fail_loudly():
    source = TINY.replace(
        "        return BaseModelOutputWithPast(",
        "        for block in self.blocks:\n            hidden_states = block(hidden_states)\n"
        "        return BaseModelOutputWithPast(",
    )
    with pytest.raises(ConversionError, match="one loop over self.blocks"):
        prepare(source, through="flatten")


WRAPPED = TINY.replace(
    "class TinyModel(TinyPreTrainedModel):", "class TinyDecoder(TinyPreTrainedModel):"
).replace(
    "class TinyForCausalLM(",
    """class TinyModel(TinyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.decoder = TinyDecoder(config)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        decoder_outputs = self.decoder(input_ids=input_ids, attention_mask=attention_mask, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=decoder_outputs.last_hidden_state)


class TinyForCausalLM(""",
)


def test_wrapper_above_the_stack_is_threaded():
    module, ctx = prepare(WRAPPED)
    assert ctx.base_model_class == "TinyModel" and ctx.stack_class == "TinyDecoder"
    model = code_of(module, "TinyModel")
    assert "kv_caches=kv_caches, input_metadata=input_metadata" in model
    assert "return decoder_outputs\n" in model  # the stack returns hidden states now
    assert "def forward(self, input_ids: torch.Tensor, kv_caches" in model


def test_stack_index_name_is_fresh():
    # the forward already uses `i` (a comprehension): the stack loop's index is another name
    source = TINY.replace(
        "        hidden_states = inputs_embeds\n",
        "        hidden_states = inputs_embeds\n"
        "        odd = {i: hidden_states * i for i in (1, 2)}\n"
        "        hidden_states = odd[2]\n",
    )
    model = code_of(prepare(source)[0], "TinyModel")
    assert "for i1, block in enumerate(self.blocks):" in model
    assert "kv_cache=kv_caches[i1]" in model and "hidden_states = odd[2]" in model
