"""attention: head counts and sizes from the operands' symbolic shapes (head_shapes.py):
helper methods, latent projections, split/cat of parts, integer indexing of a fused
per-head view, and a value head size of its own (MLA's ``v_head_dim``)."""

from __future__ import annotations

from tests.converter.snippets import TINY, code_of, prepare

TINY_FORWARD = (
    "        shape = (*input_shape, -1, self.head_size)\n"
    "        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)\n"
    "        q = q.view(shape).transpose(1, 2)\n"
    "        k = k.view(shape).transpose(1, 2)\n"
    "        v = v.view(shape).transpose(1, 2)\n"
    "        if cache is not None:\n"
    "            k, v = cache.update(k, v, 0)\n"
)
TINY_INIT = "        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)\n"

# MLA, renamed: a latent projection viewed as ONE head (the old view search took its
# [B, 1, T, R] view for the key), expanded to every head by a helper method; the key is
# a new tensor [nope | rope], the value the other part of the expansion.
LATENT_INIT = """\
        self.n_h = config.num_attention_heads
        self.nope, self.rope, self.val, self.rank = 12, 4, 8, 16
        self.qk_size = self.nope + self.rope
        self.to_q = nn.Linear(config.hidden_size, self.n_h * self.qk_size)
        self.down = nn.Linear(config.hidden_size, self.rank + self.rope)
        self.up = nn.Linear(self.rank, self.n_h * (self.nope + self.val))
"""
LATENT_FORWARD = """\
        b, t = hidden_states.shape[:-1]
        q = self.to_q(hidden_states).view(b, t, -1, self.qk_size).transpose(1, 2)
        q_a, q_b = torch.split(q, [self.nope, self.rope], dim=-1)
        lat, k_b = torch.split(self.down(hidden_states), [self.rank, self.rope], dim=-1)
        lat = lat.view(b, 1, t, self.rank)
        k_b = k_b.view(b, 1, t, self.rope)
        if cache is not None:
            lat, k_b = cache.update(lat, k_b, 0)
        q = torch.cat((q_a, q_b), dim=-1)
        k, v = self.unpack(lat, k_b)
"""
UNPACK = """\
    def unpack(self, lat, k_b):
        b, _, t, _ = lat.shape
        both = self.up(lat).view(b, t, -1, self.nope + self.val).transpose(1, 2)
        k_a, val = torch.split(both, [self.nope, self.val], dim=-1)
        k_b = k_b.expand(-1, k_a.shape[1], -1, -1)
        key = both.new_empty(*both.shape[:-1], self.nope + self.rope)
        key[..., : self.nope].copy_(k_a)
        key[..., self.nope :].copy_(k_b)
        return key, val

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
"""

# Persimmon, renamed: a fused per-head [B, T, H, 3, D] view carved by integer indexing
# in a helper, then partial rotary by last-dim slices put back together with cat.
CARVED_INIT = """\
        self.n_h = config.num_attention_heads
        self.per_head = config.hidden_size // self.n_h
        self.rot = self.per_head // 2
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
"""
CARVED_FORWARD = """\
        q, k, v = self.carve(self.qkv(hidden_states))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q_r, q_p = q[..., : self.rot], q[..., self.rot :]
        q = torch.cat((q_r * 2, q_p), dim=-1)
"""
CARVE = """\
    def carve(self, fused):
        b, t, _ = fused.shape
        fused = fused.view(b, t, self.n_h, 3, self.per_head)
        return fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
"""
FORWARD = "    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):\n"


def _variant(init: str, forward: str, helper: str) -> str:
    source = TINY.replace(TINY_INIT, init).replace(TINY_FORWARD, forward)
    source = source.replace(FORWARD, helper, 1)
    assert source.count(init) == source.count(forward) == 1 and helper in source
    return source


def _attention(source: str) -> str:
    module, _ = prepare(source, through="attention")
    return " ".join(code_of(module, "TinyAttention").split())


def test_latent_attention_gets_every_head_and_its_value_head_size():
    code = _attention(_variant(LATENT_INIT, LATENT_FORWARD, UNPACK))
    assert (
        "self.attn = PagedAttention(self.n_h, self.qk_size, self.scaling, v_head_dim=self.val)"
        in code
    )
    # the sink's output has value-sized heads
    assert ".unflatten(-1, (-1, self.attn.v_head_dim))[None]" in code


def test_fused_view_carved_by_indexing_in_a_helper():
    code = _attention(_variant(CARVED_INIT, CARVED_FORWARD, CARVE))
    assert "self.attn = PagedAttention(self.n_h, self.per_head, self.scaling)" in code
    assert "v_head_dim" not in code


def test_branches_that_disagree_leave_the_older_view_search_in_charge():
    # The two arms give the key different head sizes: the interpreter keeps only what
    # both agree on, so no v_head_dim appears from one arm's value.
    forward = TINY_FORWARD.replace(
        "        v = v.view(shape).transpose(1, 2)\n",
        "        if self.config.flag:\n"
        "            v = v.view(*input_shape, -1, 2 * self.head_size).transpose(1, 2)\n"
        "        else:\n"
        "            v = v.view(shape).transpose(1, 2)\n",
    )
    source = TINY.replace(TINY_FORWARD, forward)
    assert source != TINY
    code = _attention(source)
    assert "PagedAttention(config.num_attention_heads, self.head_size, self.scaling)" in code
    assert "v_head_dim" not in code


def test_inferred_kv_heads_come_from_the_projection_width():
    # Separate q/k/v with `-1` views and a KV head count the class reads under another
    # name: the older search fell back to num_attention_heads (silently MHA); the key's
    # projection width n_kv * head_size names it.
    init = (
        "        self.n_kv = config.kv_groups\n"
        "        self.to_q = nn.Linear(config.hidden_size, config.hidden_size)\n"
        "        self.to_k = nn.Linear(config.hidden_size, self.n_kv * self.head_size)\n"
        "        self.to_v = nn.Linear(config.hidden_size, self.n_kv * self.head_size)\n"
    )
    forward = (
        "        shape = (*input_shape, -1, self.head_size)\n"
        "        q = self.to_q(hidden_states).view(shape).transpose(1, 2)\n"
        "        k = self.to_k(hidden_states).view(shape).transpose(1, 2)\n"
        "        v = self.to_v(hidden_states).view(shape).transpose(1, 2)\n"
    )
    source = TINY.replace(TINY_INIT, init).replace(TINY_FORWARD, forward)
    assert init in source and forward in source
    code = _attention(source)
    assert (
        "PagedAttention(config.num_attention_heads, self.head_size, self.scaling, "
        "num_kv_heads=self.n_kv)" in code
    )


def test_an_if_returning_from_every_arm_returns_what_the_arms_agree_on():
    """OpenAI GPT's split helper returns from both arms of an if/else: the returned values
    merge (they are no environments: merging them as such raised TypeError once); a
    literal flag runs only the arm it selects."""
    import libcst as cst

    from converter.analysis.head_shapes import Interpreter

    helper = cst.parse_module(
        "def fold(self, z, flip=False):\n"
        "    w = z.view(2, 3, 4, 5)\n"
        "    if flip:\n"
        "        w = w.permute(0, 2, 3, 1)\n"
        "        return w\n"
        "    else:\n"
        "        return w.permute(0, 2, 1, 3)\n"
    ).body[0]
    body = list(helper.body.body)
    kind, value = Interpreter({}, {}).run(body, {"z": None})
    assert kind == "return" and value.dims == ("2", "4", None, None)
    kind, value = Interpreter({}, {}).run(body, {"z": None, "flip": True})
    assert kind == "return" and value.dims == ("2", "4", "5", "3")


def test_operands_the_view_search_used_to_cover():
    """What the older first-view search handled, now the interpreter's: parameters the
    attention projects are [B, T, C] (CTRL's forward(v, k, q)); split sizes `n * [d]`
    (GPT-BigCode's fused MHA); a name one arm leaves unbound; a cat along the time axis
    with a part read from a container (Dory's past keys)."""
    import libcst as cst

    from converter.analysis.head_shapes import operand_shapes

    cls = cst.parse_module(
        "class A:\n"
        "    def __init__(self, config):\n"
        "        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)\n"
        "        self.wk = nn.Linear(config.hidden_size, config.hidden_size)\n"
        "    def forward(self, v, k, past=None):\n"
        "        if past is not None:\n"
        "            cached = past.layers[0].keys\n"
        "        else:\n"
        "            q, kk, vv = (\n"
        "                self.c_attn(v)\n"
        "                .view(*v.shape[:2], self.num_heads, 3 * self.head_dim)\n"
        "                .transpose(1, 2)\n"
        "                .split(3 * [self.head_dim], dim=3)\n"
        "            )\n"
        "        key = self.wk(k).view(*k.shape[:-1], -1, self.head_dim).transpose(1, 2)\n"
        "        key = torch.cat([past[0], key], dim=-2)\n"
        "        out, w = attention_interface(self, q, key, vv, None, scaling=1.0)\n"
    ).body[0]
    methods = {f.name.value: f for f in cls.body.body}
    forward = methods["forward"]
    call = forward.body.body[-1].body[0].value  # the attention_interface(...) call
    operands = [a.value for a in call.args[1:4]]
    q, k, v = operand_shapes(forward, call, operands, methods)
    assert q == (None, "self.num_heads", None, "self.head_dim") == v
    assert k == (None, "-1", None, "self.head_dim")
