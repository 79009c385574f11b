"""Dead-store elimination and containers: a store into a local container nobody reads
goes; a store into a parameter's container stays, whatever exit the function takes
(the caller sees it: gemma3n's ``shared_kv_states[t] = key, value`` read by later layers)."""

from __future__ import annotations

import libcst as cst

from converter.analysis.liveness import eliminate_dead_stores

SOURCE = """
def forward(self, x, handoff=None, *, odd_box):
    scratch = {}
    scratch["a"] = x
    if self.flag:
        handoff[self.kind] = x, x + 1
        return self.proj(x)
    odd_box[0] = x
    return self.proj(x)
"""


def test_stores_into_parameter_containers_stay():
    code = cst.Module(body=[eliminate_dead_stores(cst.parse_module(SOURCE).body[0])]).code
    assert "handoff[self.kind] = x, x + 1" in code
    assert "odd_box[0] = x" in code
    assert "scratch" not in code


def test_rebinding_a_parameter_is_still_dead():
    source = SOURCE.replace("    scratch = {}\n", "    odd_spare = x * 2\n").replace(
        "handoff=None,", "handoff=None, odd_spare=None,"
    )
    code = cst.Module(body=[eliminate_dead_stores(cst.parse_module(source).body[0])]).code
    assert "odd_spare = x * 2" not in code and "handoff[self.kind]" in code
