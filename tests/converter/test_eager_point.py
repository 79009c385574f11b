"""eager_core + eager_point: a core that splits the query's heads only after the KV-cache
update (XGLM: view + transpose, then reshape(B * H, T, D) for bmm) gets its paged call
after that split; a softmax in a dtype if/else (both arms softmax only) is no pair of
alternative cores."""

from tests.converter.snippets import TINY, code_of, prepare

TINY_FORWARD = TINY[
    TINY.index("        shape = (*input_shape, -1, self.head_size)\n") : TINY.index(
        "class TinyBlock"
    )
]
LATE_SPLIT = """\
        b, t = input_shape
        shape = (*input_shape, -1, self.head_size)
        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
        k = k.view(shape).transpose(1, 2)
        v = v.view(shape).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, 0)
        flat = (b * self.n_h, -1, self.head_size)
        q = q.view(b, t, self.n_h, self.head_size).transpose(1, 2)
        q = q.reshape(*flat)
        k = k.reshape(*flat)
        v = v.reshape(*flat)
        w = torch.bmm(q, k.transpose(1, 2)) * self.scaling
        if w.dtype == torch.float16:
            w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(torch.float16)
        else:
            w = nn.functional.softmax(w, dim=-1)
        o = torch.bmm(w, v)
        o = o.view(b, self.n_h, t, self.head_size).transpose(1, 2).reshape(b, t, -1)
        return self.resid_drop(self.out(o)), w


"""


def test_paged_call_follows_the_late_head_split():
    source = TINY.replace(TINY_FORWARD, LATE_SPLIT).replace(
        "        self.scaling =",
        "        self.n_h = config.num_attention_heads\n        self.scaling =",
        1,
    )
    assert "self.n_h = config" in source and "torch.bmm" in source
    module, _ = prepare(source, through="attention")
    code = code_of(module, "TinyAttention")
    flat = " ".join(code.split())
    assert "self.attn = PagedAttention(self.n_h, self.head_size, self.scaling)" in flat
    split = code.index("q = q.view(b, t, self.n_h, self.head_size).transpose(1, 2)")
    call = code.index("o = self.attn(q.transpose(1, 2)[0], k.transpose(1, 2)[0]")
    assert split < call
    assert "bmm" not in code and "softmax" not in code and "reshape(*flat)" not in code
