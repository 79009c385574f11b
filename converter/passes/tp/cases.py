"""Tensor-parallel styles chosen by the config when the model is built.

One generated module serves every config of its type, and some projections hold
layouts a config flag chooses (Falcon's fused QKV: grouped, multi-query or interleaved
per head). A rules/architectures.toml tp_plan entry may then list cases instead of one
style, as data: the first case whose tests all hold wins, the last case has none.

    "h.*.attn.qkv" = [
        { style = "colwise", when = { grouped = true }, tp_divides = "num_kv_heads" },
        { style = "colwise_qkv", when = { grouped = false, multi_query = true } },
        { style = "colwise_gather_output" },
    ]

Tests are over the config the layer's ``__init__`` reads: ``when`` maps config fields to
the value they must have (``true``: ``config.f``, ``false``: ``not config.f``, any other
value: ``config.f == value``), ``tp_divides`` names a config field the TP size must
divide (``config.f % get_tp_size() == 0``). The TP pass turns the cases into a
conditional expression in the generated ``__init__``.

Only column styles may be cases: `colwise` (contiguous chunks of the output: whole heads /
whole KV groups where the layout keeps them together), `colwise_qkv` (a [Q|K|V] output
cut per segment, `QKVParallelLinear` with the attention's head counts: one K/V head
replicates) and `colwise_gather_output` (every head on every rank). Whether the class's
heads are split is then a build-time flag, `sharded_test`, that the TP pass stores on the
module and passes to the head-count helpers and to the row-parallel consumer's
`input_is_parallel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

CASE_STYLES = ("colwise", "colwise_qkv", "colwise_gather_output")
KEYS = ("style", "when", "tp_divides")
FORM = (
    'a list of { style = "<style>", when = { <config field> = <value>, ... }, '
    'tp_divides = "<config field>" } tables, the last one with a style only'
)


@dataclass(frozen=True)
class Case:
    """One case of a config-chosen style: its tests and the style it picks."""

    style: str
    when: tuple[tuple[str, bool | int | float | str], ...] = ()  # (config field, value)
    tp_divides: str | None = None  # a config field the TP size must divide

    def test(self, config: cst.BaseExpression) -> cst.BaseExpression | None:
        """The case's condition over `config` (the config `__init__` reads); None for the
        fallback case."""
        terms: list[cst.BaseExpression] = []
        for name, value in self.when:
            field = cst.Attribute(config, cst.Name(name))
            if value is True:
                terms.append(field)
            elif value is False:
                terms.append(cst.UnaryOperation(cst.Not(), field))
            else:
                terms.append(
                    cst.Comparison(field, [cst.ComparisonTarget(cst.Equal(), _literal(value))])
                )
        if self.tp_divides is not None:
            remainder = cst.BinaryOperation(
                cst.Attribute(config, cst.Name(self.tp_divides)),
                cst.Modulo(),
                cst.Call(cst.Name("get_tp_size")),
            )
            terms.append(
                cst.Comparison(remainder, [cst.ComparisonTarget(cst.Equal(), cst.Integer("0"))])
            )
        return _joined(terms, cst.And()) if terms else None

    @property
    def runtime_names(self) -> set[str]:
        """runtime.parallel functions the test calls (to import)."""
        return {"get_tp_size"} if self.tp_divides is not None else set()


def _literal(value: bool | int | float | str) -> cst.BaseExpression:
    if isinstance(value, str):
        return cst.SimpleString(repr(value))
    return cst.Float(repr(value)) if isinstance(value, float) else cst.Integer(str(value))


def _joined(terms: list[cst.BaseExpression], op: cst.BaseBooleanOp) -> cst.BaseExpression:
    out = terms[0]
    for term in terms[1:]:
        out = cst.BooleanOperation(out, op, term)
    return out


def _parens(node: cst.BaseExpression) -> cst.BaseExpression:
    return node.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])


def parse_cases(value: object) -> tuple[Case, ...]:
    """A plan entry's cases; ValueError (one line, what to write) if malformed."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"a conditional tp_plan entry must be {FORM}, got {value!r}")
    cases = []
    for i, entry in enumerate(value):
        last = i == len(value) - 1
        if not isinstance(entry, dict) or set(entry) - set(KEYS) or "style" not in entry:
            raise ValueError(f"tp_plan case {entry!r} must be {FORM}")
        style, when, divides = entry["style"], entry.get("when", {}), entry.get("tp_divides")
        if style not in CASE_STYLES:
            raise ValueError(f"tp_plan case style {style!r} is not one of {', '.join(CASE_STYLES)}")
        scalar = (bool, int, float, str)
        if not isinstance(when, dict) or not all(
            isinstance(k, str) and k.isidentifier() and isinstance(v, scalar)
            for k, v in when.items()
        ):
            raise ValueError(f"tp_plan case {entry!r}: `when` maps config fields to values")
        if divides is not None and not (isinstance(divides, str) and divides.isidentifier()):
            raise ValueError(f"tp_plan case {entry!r}: `tp_divides` names a config field")
        if last == bool(when or divides):
            raise ValueError(f"tp_plan case {entry!r} must be {FORM}")
        cases.append(Case(style, tuple(when.items()), divides))
    return tuple(cases)


def is_sharded(style: str) -> bool:
    return style != "colwise_gather_output"


def sharded_test(cases: tuple[Case, ...], config: cst.BaseExpression) -> cst.BaseExpression:
    """ "The case the config picks leaves heads sharded over ranks", over `config`.

    Built from the last case back: a sharded case is `(test) or rest`, a gathered one
    `not (test) and rest`, constant tails folded away.
    """
    acc: cst.BaseExpression | bool = is_sharded(cases[-1].style)
    for case in reversed(cases[:-1]):
        test = _parens(case.test(config))
        if is_sharded(case.style):
            acc = True if acc is True else test if acc is False else _joined([test, acc], cst.Or())
        elif acc is not False:
            negated = cst.UnaryOperation(cst.Not(), test)
            if acc is True:
                acc = negated
            else:
                acc = _joined([negated, acc if _only(acc, cst.And) else _parens(acc)], cst.And())
    return cst.Name(str(acc)) if isinstance(acc, bool) else acc


def _only(node: cst.BaseExpression, op: type) -> bool:
    """Whether `node` is a chain of `op` alone at its top (no parentheses needed after it)."""
    return not isinstance(node, cst.BooleanOperation) or (
        isinstance(node.operator, op) and not node.lpar and _only(node.right, op)
    )


def runtime_names(cases: tuple[Case, ...]) -> set[str]:
    return set().union(*(c.runtime_names for c in cases))


def plan_override(plan: dict[str, object]) -> dict[str, str | tuple[Case, ...]]:
    """A rules tp_plan with its conditional entries as (hashable) cases."""
    return {k: v if isinstance(v, str) else parse_cases(v) for k, v in plan.items()}
