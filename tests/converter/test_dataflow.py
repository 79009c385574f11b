"""The pruner's partial evaluator: removed values are None, self.training is False."""

import libcst as cst
import pytest

from converter.analysis.callgraph import Function, bind
from converter.analysis.dataflow import (
    DEAD,
    MAYBE_NONE,
    NONNONE,
    UNKNOWN,
    Env,
    const,
    merge,
    reads_dead,
    truth,
    value,
)
from converter.passes.prune.calls import rebuild_args


def env() -> Env:
    e = Env({"mask", "ids", "x", "flag", "n", "out"}, module_symbols={"torch", "F"})
    e.values.update(mask=DEAD, ids=NONNONE, x=UNKNOWN, flag=const(False), n=const(3))
    return e


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("mask is None", True),
        ("mask is not None", False),
        ("ids is None", False),
        ("x is None", None),  # unknown stays unknown
        ("not mask", True),
        ("self.training", False),
        ("self.training and x", False),  # short circuit on a known operand
        ("x and mask is not None", False),
        ("x or mask is None", True),
        ("(ids is None) ^ (mask is not None)", False),
        ("isinstance(mask, dict)", False),
        ("n > 2", True),
        ("flag", False),
        ("x > 2", None),
        ("undefined_local", False),  # bound nowhere: its producer was removed
        ("torch", None),  # module symbols are not judged
    ],
)
def test_truth(expr, expected):
    assert truth(cst.parse_expression(expr), env()) is expected


def test_values_and_walrus():
    e = env()
    assert value(cst.parse_expression("0 if mask is None else mask.shape[0]"), e) == const(0)
    assert value(cst.parse_expression("ids[None]"), e) == NONNONE
    assert truth(cst.parse_expression("not isinstance(m := mask, dict)"), e) is True
    assert e.get("m") == DEAD  # the walrus bound the removed value
    assert merge(const(1), NONNONE) == NONNONE
    # None on one path: still unknown to every test, but never promoted to "set"
    assert merge(DEAD, NONNONE) == MAYBE_NONE != UNKNOWN and MAYBE_NONE.kind == "unknown"
    assert merge(MAYBE_NONE, const(2)) == MAYBE_NONE and merge(UNKNOWN, NONNONE) == UNKNOWN


def test_reads_dead_ignores_attributes_keywords_and_comprehension_variables():
    e = env()
    e.scoped = {"norm"}
    assert reads_dead(cst.parse_expression("F.pad(attention_mask=ids, y=mask.dim())"), e) == [
        "mask"
    ]
    assert reads_dead(cst.parse_expression("[norm(ids) for norm in ids.norms]"), e) == []


def _fn(code: str) -> Function:
    return Function("f", None, cst.parse_statement(code))


def test_bind_and_rebuild_keep_positions():
    fn = _fn("def f(h, mask=None, cache=None, *rest, flag=False, **extra): pass")
    call = cst.parse_expression("f(a, m, c, d, flag=True, other=1)")
    bound = bind(call, fn)
    assert [p for p, _ in bound] == ["h", "mask", "cache", "*rest", "flag", "**extra"]
    # dropping the positional mask turns the later positional `c` into a keyword
    fn2 = _fn("def f(h, mask=None, cache=None): pass")
    call2 = cst.parse_expression("f(a, m, c)")
    args = rebuild_args(bind(call2, fn2), {1})
    assert cst.Module([]).code_for_node(call2.with_changes(args=args)) == "f(a, cache=c)"
    assert bind(cst.parse_expression("f(*xs)"), fn2) is None  # cannot bind statically


def test_items_of_a_container_holding_none_may_be_none():
    """Beam: `scalings[kind] = None` on one path makes `scalings[kind]` maybe None, and an
    entry of a config table may be None: neither is assumed set (the usual rule for
    subscripts) so `x is None` tests on them stay."""
    from converter.analysis.dataflow import HOLDS_NONE

    e = env()
    e.values["out"] = HOLDS_NONE
    assert value(cst.parse_expression("out[k]"), e) == MAYBE_NONE
    assert truth(cst.parse_expression("out[k] is None"), e) is None
    assert value(cst.parse_expression("ids[0]"), e) == NONNONE  # other subscripts: set
    assert truth(cst.parse_expression("self.config.rope_parameters[k] is None"), e) is None
    assert merge(HOLDS_NONE, UNKNOWN) == HOLDS_NONE
    assert merge(HOLDS_NONE, DEAD) == MAYBE_NONE
