"""Dead-store elimination: an if whose body lost every store goes with its test, so the
names only that test read die too (Falcon's ``if alibi is not None and mask is not None``
block that folded the bias into the mask)."""

from __future__ import annotations

import libcst as cst

from converter.analysis.liveness import eliminate_dead_stores

SOURCE = """
def forward(self, x):
    extra = build(x)
    gate = make_gate(x)
    if extra is not None and gate.ndim == 4:
        gate = gate + extra
    y = self.proj(x)
    return y
"""


def test_emptied_if_takes_its_test_reads_with_it():
    func = cst.parse_module(SOURCE).body[0]
    code = cst.Module(body=[eliminate_dead_stores(func)]).code
    assert "if extra" not in code
    assert "build(" not in code and "make_gate(" not in code
    assert "y = self.proj(x)" in code


def test_live_if_keeps_its_test_reads():
    source = SOURCE.replace("    return y\n", "    return y + gate\n")
    func = cst.parse_module(source).body[0]
    code = cst.Module(body=[eliminate_dead_stores(func)]).code
    assert "if extra is not None and gate.ndim == 4:" in code and "extra = build(x)" in code


LOOP = """
def forward(self, x):
    table = {"a": build}
    found = {}
    for kind in set(self.kinds):
        found[kind] = table[kind]()
    y = self.proj(x)
    return y
"""


def test_emptied_for_loop_goes_with_its_iterable():
    # Llama 4's mask mapping, filled per layer type and then never read
    func = cst.parse_module(LOOP).body[0]
    code = cst.Module(body=[eliminate_dead_stores(func)]).code
    assert "for kind" not in code and "table" not in code and "found" not in code


def test_emptied_for_loop_whose_target_is_read_after_stays():
    source = LOOP.replace("    return y\n", "    return y + kind\n")
    func = cst.parse_module(source).body[0]
    code = cst.Module(body=[eliminate_dead_stores(func)]).code
    assert "for kind in set(self.kinds):" in code
