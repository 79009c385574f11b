"""Head sizes with KV sharing (gemma4): a branch that reads k/v out of a container takes
the shape the other branch computes, and a head count read through an ``__init__`` local
bound once (``odd_layer = config.per_layer[i]``) is valid for the PagedAttention ctor."""

from __future__ import annotations

from converter.cst_helpers import code
from tests.converter.snippets import TINY, prepare

INIT = """\
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
"""
NEW_INIT = """\
        odd_layer = config.odd_layers[layer_idx]
        self.odd_reuse = odd_layer.reuse
        self.to_q = nn.Linear(config.hidden_size, config.hidden_size)
        self.to_k = nn.Linear(config.hidden_size, odd_layer.kv_heads * self.head_size)
        self.to_v = nn.Linear(config.hidden_size, odd_layer.kv_heads * self.head_size)
"""
FORWARD = """\
        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
        q = q.view(shape).transpose(1, 2)
        k = k.view(shape).transpose(1, 2)
        v = v.view(shape).transpose(1, 2)
"""
NEW_FORWARD = """\
        q = self.to_q(hidden_states).view(shape).transpose(1, 2)
        if self.odd_reuse:
            k, v = kwargs["odd_store"][self.config.odd_kind]
        else:
            k = self.to_k(hidden_states).view(shape).transpose(1, 2)
            v = self.to_v(hidden_states).view(shape).transpose(1, 2)
"""


def test_container_branch_takes_the_computed_shape():
    assert INIT in TINY and FORWARD in TINY
    source = TINY.replace(INIT, NEW_INIT).replace(FORWARD, NEW_FORWARD)
    _, ctx = prepare(source, through="attention")
    args = ctx.paged_attention["TinyAttention"]
    assert code(args["num_kv_heads"]) == "odd_layer.kv_heads"
