"""Abstract values for the pruner: which names are None (removed), constant, or unknown.

A removed parameter (or one no caller passes, defaulting to None) is DEAD: ``x is None``
is True, ``x is not None`` False, ``x and y`` falsy, ``self.training`` is False.
`truth` partially evaluates conditions; `reads_dead` tells whether an expression still
depends on a removed value (the statement holding it then goes).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from converter.cst_helpers import BUILTINS, code, dotted, names_read


@dataclass(frozen=True)
class Value:
    kind: str  # "dead" | "const" | "nonnone" | "unknown"
    const: object = None


DEAD = Value("dead")
NONNONE = Value("nonnone")
UNKNOWN = Value("unknown")
# Unknown, but one of the paths binding it gives None (`x if c else None`): a caller
# passing it never lets the callee assume it is set.
MAYBE_NONE = Value("unknown", "maybe None")
# A container into which None was stored (`scalings[kind] = None`) on some path: its
# items may be None, so reading one is MAYBE_NONE rather than the usual non-None.
HOLDS_NONE = Value("unknown", "holds None")
FALSE_ATTRS = {"self.training"}  # inference: never training


def const(v) -> Value:
    return Value("const", v)


def merge(a: Value, b: Value) -> Value:
    if a == b:
        return a
    if HOLDS_NONE in (a, b) and DEAD not in (a, b):
        return HOLDS_NONE
    if a.kind in ("const", "nonnone") and b.kind in ("const", "nonnone"):
        return NONNONE
    if DEAD in (a, b) or MAYBE_NONE in (a, b):
        return MAYBE_NONE
    return UNKNOWN


def literal(expr: cst.BaseExpression) -> Value:
    """State of a default value / literal expression."""
    if m.matches(expr, m.Name("None")):
        return DEAD
    if isinstance(
        expr, (cst.Integer, cst.Float, cst.SimpleString, cst.UnaryOperation)
    ) or m.matches(expr, m.Name("True") | m.Name("False")):
        try:
            return const(ast.literal_eval(code(expr)))
        except (ValueError, SyntaxError):
            return UNKNOWN
    return UNKNOWN


class Env:
    """Name states inside one function. `local` holds every name the function binds;
    a local name read before any binding is DEAD (its producer was removed)."""

    def __init__(
        self, local: set[str], module_symbols: set[str], scoped: set[str] = frozenset()
    ) -> None:
        self.values: dict[str, Value] = {}
        self.local = local
        self.module_symbols = module_symbols
        self.scoped = scoped  # comprehension / lambda variables: never judged

    def copy(self) -> Env:
        new = Env(self.local, self.module_symbols, self.scoped)
        new.values = dict(self.values)
        return new

    def get(self, name: str) -> Value:
        if name in self.values:
            return self.values[name]
        if name == "None":
            return DEAD
        if name in ("True", "False"):
            return const(name == "True")
        if name in self.scoped:
            return UNKNOWN
        if name in self.local or (name not in self.module_symbols and name not in BUILTINS):
            return DEAD
        return UNKNOWN

    def merge_from(self, a: Env, b: Env) -> None:
        for name in set(a.values) | set(b.values):
            self.values[name] = merge(a.get(name), b.get(name))


def value(expr: cst.BaseExpression, env: Env) -> Value:
    if isinstance(expr, cst.Name):
        return env.get(expr.value)
    if dotted(expr) in FALSE_ATTRS:
        return const(False)
    lit = literal(expr)
    if lit.kind != "unknown":
        return lit
    if isinstance(expr, cst.IfExp):
        t = truth(expr.test, env)
        if t is not None:
            return value(expr.body if t else expr.orelse, env)
        return merge(value(expr.body, env), value(expr.orelse, env))
    if isinstance(expr, cst.NamedExpr):
        v = value(expr.value, env)
        if isinstance(expr.target, cst.Name):
            env.values[expr.target.value] = v
        return v
    if (
        isinstance(expr, (cst.Comparison, cst.BooleanOperation))
        or m.matches(expr, m.UnaryOperation(operator=m.Not()))
        or m.matches(expr, m.BinaryOperation(operator=m.BitXor()))
    ):
        t = truth(expr, env)
        return const(t) if t is not None else UNKNOWN
    if isinstance(expr, cst.Call) and dotted(expr.func) == "isinstance" and expr.args:
        t = truth(expr, env)
        return const(t) if t is not None else UNKNOWN
    if isinstance(expr, cst.Subscript) and _reads_config(expr.value):
        return UNKNOWN  # an entry of a config table may be None (Beam's NoPE layers' rope)
    if isinstance(expr, cst.Subscript) and isinstance(expr.value, cst.Name):
        if env.get(expr.value.value) == HOLDS_NONE:
            return MAYBE_NONE
    if isinstance(
        expr, (cst.Subscript, cst.BinaryOperation, cst.Tuple, cst.List, cst.Dict, cst.ListComp)
    ):
        return NONNONE
    return UNKNOWN


def _reads_config(expr: cst.BaseExpression) -> bool:
    """``config.x`` / ``self.config.x`` (any depth): a value read from the model config."""
    name = dotted(expr) or ""
    return name.startswith(("config.", "self.config."))


def truth(expr: cst.BaseExpression, env: Env) -> bool | None:
    """Truthiness of a condition, when the dead/constant names decide it."""
    if isinstance(expr, cst.UnaryOperation) and isinstance(expr.operator, cst.Not):
        t = truth(expr.expression, env)
        return None if t is None else not t
    if isinstance(expr, cst.BooleanOperation):
        left = truth(expr.left, env)
        is_and = isinstance(expr.operator, cst.And)
        if left is not None and left != is_and:
            return left  # short circuit: False and ..., True or ...
        right = truth(expr.right, env)
        if left is not None:
            return right
        return (False if is_and else True) if right == (not is_and) else None
    if isinstance(expr, cst.BinaryOperation) and isinstance(expr.operator, cst.BitXor):
        a, b = truth(expr.left, env), truth(expr.right, env)
        return None if a is None or b is None else a != b
    if isinstance(expr, cst.Comparison) and len(expr.comparisons) == 1:
        comp = expr.comparisons[0]
        left, right = value(expr.left, env), value(comp.comparator, env)
        if isinstance(comp.operator, (cst.Is, cst.IsNot)):
            negate = isinstance(comp.operator, cst.IsNot)
            if right == DEAD and left.kind != "unknown":
                return (left == DEAD) != negate
            return None
        if left.kind == "const" and right.kind == "const":
            ops = {
                cst.Equal: "==",
                cst.NotEqual: "!=",
                cst.LessThan: "<",
                cst.GreaterThan: ">",
                cst.LessThanEqual: "<=",
                cst.GreaterThanEqual: ">=",
            }
            op = ops.get(type(comp.operator))
            if op is not None:
                try:
                    return bool(eval(f"a {op} b", {"a": left.const, "b": right.const}))  # noqa: S307
                except TypeError:
                    return None
        return None
    if isinstance(expr, cst.Call) and dotted(expr.func) == "isinstance" and expr.args:
        return False if value(expr.args[0].value, env) == DEAD else None
    if isinstance(expr, cst.NamedExpr):
        return truth_of_value(value(expr, env))
    return truth_of_value(value(expr, env))


def truth_of_value(v: Value) -> bool | None:
    if v == DEAD:
        return False
    if v.kind == "const":
        return bool(v.const)
    return None


def reads_dead(node: cst.CSTNode, env: Env) -> list[str]:
    """Dead names an expression (or statement) reads; [] if none."""
    return sorted(n for n in names_read(node) if n != "None" and env.get(n) == DEAD)
