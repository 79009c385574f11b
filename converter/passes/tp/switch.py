"""The TP pass's side of config-chosen styles (converter/passes/tp/cases.py): one constructor
per case in a conditional expression, and the module's "heads are sharded" flag.

    self.shard_heads = (c1) or (c2)                       # before its first reader
    self.qkv = (
        ColumnParallelLinear(...) if c1 else QKVParallelLinear(...) if c2
        else ColumnParallelLinear(..., gather_output=True)
    )

Both are evaluated where `__init__` builds the layer, so an attribute they read that
`__init__` assigns only later (QKVParallelLinear's KV head count, `self.num_kv_heads`
set after the projection) is replaced by its assigned value, recursively.
"""

from __future__ import annotations

from collections.abc import Callable

import libcst as cst

from converter.context import ConversionContext
from converter.cst_helpers import code, find_all, self_attr
from converter.passes.tp.args import expr
from converter.passes.tp.cases import Case, sharded_test

FLAG = "shard_heads"  # self.<FLAG>: does this config shard the class's heads over ranks
STATIC_SHARDED = ("colwise", "colwise_qkv")  # plain styles that leave heads sharded
ATOMS = (cst.Name, cst.Attribute, cst.Call, cst.Subscript, cst.Integer, cst.Float)


def flag_name(cls: cst.ClassDef) -> str:
    """`shard_heads`, or with trailing underscores where the class uses that name."""
    taken = {n.attr.value for n in find_all(cls, lambda n: isinstance(n, cst.Attribute))}
    name = FLAG
    while name in taken:
        name += "_"
    return name


def config_of(init: cst.FunctionDef) -> cst.BaseExpression:
    """The config `init` reads: its `config` parameter, else `self.config`."""
    if any(p.name.value == "config" for p in init.params.params):
        return cst.Name("config")
    return expr("self.config")


def switch(
    cases: tuple[Case, ...],
    config: cst.BaseExpression,
    build: Callable[[str], cst.BaseExpression],
) -> cst.IfExp:
    """`build(s1) if t1 else build(s2) if t2 else build(s_last)`, in parentheses: each
    case's test over `config`."""
    value = build(cases[-1].style)
    for case in reversed(cases[:-1]):
        value = cst.IfExp(test=case.test(config), body=build(case.style), orelse=value)
    return value.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])


def attr_values(init: cst.FunctionDef) -> dict[str, cst.BaseExpression]:
    """Each `self.X`'s first assigned value in `__init__` (in source order, any depth)."""
    values: dict[str, cst.BaseExpression] = {}
    for node in find_all(init, lambda n: isinstance(n, cst.Assign)):
        if len(node.targets) == 1:
            attr = self_attr(node.targets[0].target)
            if attr and attr not in values:
                values[attr] = node.value
    return values


def assigned_attrs(node: cst.CSTNode) -> set[str]:
    """`self.X` attributes a statement assigns."""
    found = find_all(node, lambda n: isinstance(n, cst.AssignTarget))
    return {a for t in found if (a := self_attr(t.target))}


class InlineLater(cst.CSTTransformer):
    """`self.X` not assigned yet (not in `seen`) -> `(<its value>)`, recursively."""

    def __init__(self, values: dict[str, cst.BaseExpression], seen: set[str]) -> None:
        self.values, self.seen = values, seen

    def leave_Attribute(
        self, original: cst.Attribute, updated: cst.Attribute
    ) -> cst.BaseExpression:
        attr = self_attr(original)
        if attr is None or attr in self.seen or attr not in self.values:
            return updated
        inner = InlineLater(self.values, self.seen | {attr})  # no cycles
        value = self.values[attr].visit(inner)
        if isinstance(value, ATOMS) or value.lpar:
            return value
        return value.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])


def insert_flag(init: cst.FunctionDef, name: str, value: cst.BaseExpression) -> cst.FunctionDef:
    """`self.<name> = <value>` before the first top-level statement of `init` reading it."""
    body = list(init.body.body)
    reads = [
        i
        for i, stmt in enumerate(body)
        if find_all(stmt, lambda n: isinstance(n, cst.Attribute) and self_attr(n) == name)
    ]
    if not reads:
        return init
    at = reads[0]
    seen = set().union(*(assigned_attrs(s) for s in body[:at]))
    value = value.visit(InlineLater(attr_values(init), seen))
    stmt = cst.parse_statement(f"self.{name} = 0")
    assign = stmt.body[0].with_changes(value=value)
    comment = "# this config's tensor-parallel plan shards the heads (rules tp_plan cases)"
    stmt = stmt.with_changes(
        body=[assign],
        leading_lines=[cst.EmptyLine(comment=cst.Comment(comment))],
    )
    body.insert(at, stmt)
    return init.with_changes(body=init.body.with_changes(body=body))


def sharded_conditions(decisions: dict, ctx: ConversionContext) -> dict[str, tuple[Case, ...]]:
    """Classes whose projections' styles the config picks (rules tp_plan cases): the cases
    deciding whether their heads are sharded, one condition per class."""
    out: dict[str, set[str]] = {}
    cases: dict[str, tuple[Case, ...]] = {}
    for (cls, _), d in decisions.items():
        if d.style == "conditional":
            out.setdefault(cls, set()).add(code(sharded_test(d.cases, cst.Name("config"))))
            cases[cls] = d.cases
    for cls, texts in out.items():
        fixed = [a for (c, a), d in decisions.items() if c == cls and d.style in STATIC_SHARDED]
        if len(texts) > 1 or fixed:
            also = f" and {fixed} always" if fixed else ""
            raise ctx.error(
                f"{cls}: tp_plan cases must shard its heads under one condition, got "
                f"{sorted(texts)}{also}",
                hint="give every q/k/v projection of the class the same cases in rules/architectures.toml",
            )
    return cases


class GuardedQKVSplit(cst.CSTTransformer):
    """``self.<qkv>(x)[.unsqueeze(d)...].split(sizes, dim=d)`` where the config may build
    ``self.<qkv>`` as a ``QKVParallelLinear`` (a `colwise_qkv` case): its local output is
    [Q_r | K | V], so the split takes the layer's own sizes when it is one, the source's
    otherwise. Splits after a view / reshape cut heads, not the fused output: left alone."""

    def __init__(self, attr: str) -> None:
        self.attr = attr
        self.used: set[str] = set()

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        func = updated.func
        if not (isinstance(func, cst.Attribute) and func.attr.value == "split"):
            return updated
        if not updated.args or updated.args[0].keyword is not None:
            return updated
        node = func.value
        while (
            isinstance(node, cst.Call)
            and isinstance(node.func, cst.Attribute)
            and node.func.attr.value == "unsqueeze"
        ):
            node = node.func.value
        if not (isinstance(node, cst.Call) and self_attr(node.func) == self.attr):
            return updated
        layer = f"self.{self.attr}"
        local = expr(f"[{layer}.q_size, {layer}.kv_size, {layer}.kv_size]")
        sizes = cst.IfExp(
            test=expr(f"isinstance({layer}, QKVParallelLinear)"),
            body=local,
            orelse=updated.args[0].value,
        )
        self.used.add("QKVParallelLinear")
        return updated.with_changes(
            args=[updated.args[0].with_changes(value=sizes), *updated.args[1:]]
        )
