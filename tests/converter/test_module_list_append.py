"""A ``nn.ModuleList()`` filled by ``self.<list>.append(Cls(...))`` in ``__init__`` has
``Cls`` elements, and a comprehension over it calls their forward (granite_swa's
per-theta rotary embeddings), so the select pass keeps that forward."""

from __future__ import annotations

from tests.converter.snippets import TINY, code_of, prepare

SOURCE = (
    TINY.replace(
        "class TinyModel(TinyPreTrainedModel):",
        "class TinyOddTable(nn.Module):\n"
        "    def __init__(self, width):\n"
        "        super().__init__()\n"
        "        self.width = width\n\n"
        "    def forward(self, x):\n"
        "        return x * self.width\n\n\n"
        "class TinyModel(TinyPreTrainedModel):",
    )
    .replace(
        "        self.gradient_checkpointing = False\n",
        "        self.gradient_checkpointing = False\n"
        "        self.odd_tables = nn.ModuleList()\n"
        "        for width in (1, 2):\n"
        "            self.odd_tables.append(TinyOddTable(width))\n",
    )
    .replace(
        "        hidden_states = inputs_embeds\n",
        "        hidden_states = inputs_embeds\n"
        "        scaled = {t.width: t(hidden_states) for t in self.odd_tables}\n"
        "        hidden_states = hidden_states + scaled[1]\n",
    )
)


def test_appended_elements_are_the_lists_class():
    _, ctx = prepare(SOURCE, upto="imports")
    child = ctx.classes["TinyModel"].children["odd_tables"]
    assert child.cls == "TinyOddTable" and child.in_list


def test_comprehension_over_the_list_keeps_the_element_forward():
    module, _ = prepare(SOURCE)
    assert "return x * self.width" in code_of(module, "TinyOddTable")
