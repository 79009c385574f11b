"""flatten: a base-model parameter the paged signature drops but whose default is a
literal other than None (gemma4's ``logits_to_keep=0``) becomes a local bound to that
default, so code reading it keeps HF's no-argument behaviour; None defaults stay removed."""

from __future__ import annotations

from tests.converter.snippets import TINY, code_of, prepare

SOURCE = TINY.replace(
    "position_ids=None, cache=None, inputs_embeds=None, **kwargs):\n",
    "position_ids=None, cache=None, inputs_embeds=None, odd_keep=0, odd_sign=-1, **kwargs):\n",
).replace(
    "        hidden_states = inputs_embeds\n",
    "        hidden_states = inputs_embeds[:, odd_keep:] * odd_sign\n",
)


def test_literal_default_becomes_a_local():
    model = code_of(prepare(SOURCE, through="flatten")[0], "TinyModel")
    assert "        odd_keep = 0\n        odd_sign = -1\n" in model
    assert "odd_keep=0" not in model  # not a parameter any more


def test_the_pruned_forward_reads_the_default():
    model = code_of(prepare(SOURCE)[0], "TinyModel")
    assert "odd_keep = 0" in model and "inputs_embeds[:, odd_keep:] * odd_sign" in model
    assert "cache = None" not in model and "inputs_embeds = None" not in model
