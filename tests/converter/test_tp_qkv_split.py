"""tp_fuse.LocalQKVSplit: a split of the fused [Q|K|V] layer's output uses this rank's
sizes, also when the output was first bound to a name (OpenAI GPT's ``x = self.c_attn(x)``
then ``x.split(...)``, or an elementwise function of it); a name rebound to something else
is left alone."""

import libcst as cst

from converter.passes.tp.fuse import LocalQKVSplit

LOCAL = "[self.blend.q_size, self.blend.kv_size, self.blend.kv_size]"


def _split(code: str) -> str:
    return cst.parse_module(code).visit(LocalQKVSplit("blend")).code


def test_split_through_a_bound_name():
    out = _split(
        "def forward(self, z):\n    z = self.blend(z)\n    a, b, c = z.split(self.sz, dim=2)\n"
    )
    assert f"z.split({LOCAL}, dim=2)" in out


def test_rebound_name_is_not_split_locally():
    code = (
        "def forward(self, z):\n    z = self.blend(z)\n    z = self.other(z)\n"
        "    a, b, c = z.split(self.sz, dim=2)\n"
    )
    assert _split(code) == code


def test_split_of_a_per_head_view_keeps_the_source_sizes():
    """CodeGen: ``w = self.blend(z).view(..., 3 * d)`` cuts each head's [q, v, k], not the
    fused output: its split sizes stay the source's."""
    code = (
        "def forward(self, z):\n    w = self.blend(z).view(2, 3, -1, 3 * self.d)\n"
        "    a, b, c = w.split(self.d, dim=-1)\n"
    )
    assert _split(code) == code


def test_split_after_an_elementwise_op_is_local():
    """DBRX clamps the fused output (clip_qkv) before splitting it: still [Q|K|V]."""
    out = _split(
        "def forward(self, z):\n    z = self.blend(z)\n    z = z.clamp(min=lo, max=self.clip)\n"
        "    a, b, c = z.split([self.h, self.kv, self.kv], dim=2)\n"
    )
    assert f"z.split({LOCAL}, dim=2)" in out
