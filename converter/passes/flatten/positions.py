"""Flatten, token positions below the stack: HF's "arange over this step's tokens plus
the cache length" becomes the per-token ``positions`` the paged forward already has.

Code below the decoder stack may number the current tokens itself (Llama 4's attention
temperature tuning on its NoPE layers)::

    past_seen_tokens = cache.get_seq_length(self.layer_idx) if cache is not None else 0
    positions = torch.arange(hidden_states.shape[1], device=...) + past_seen_tokens

One cache length per batch, counted along the batch's token axis. In the paged forward
the HF cache is gone (the pruner folds ``cache is not None`` to False, the length to 0)
and the "batch" is every sequence of the step flattened into ``[1, T]``: kept as it is,
the arange numbers the whole step from 0, wrong for every sequence but the first and at
every decode step. What it means is the position of each token in its sequence, which
the base model holds (``positions`` ``[1, T]``). So the expression becomes
``positions[0]`` (``[T]``), and ``positions`` is threaded from the stack loop down the
classes that reach it, keyword-only, as ``kv_cache`` is.

A cache length is a value computed by ``<cache>.get_seq_length(...)`` (also through a
local bound to it). The forms read: ``torch.arange(n) + L``, ``L + torch.arange(n)`` and
``torch.arange(L, L + n)``, with ``n`` the token axis of the forward's input
(``x.shape[1]`` / ``x.size(1)``, or a local bound to it). Any other read of a cache length
below the stack (a ``past == 0`` branch, an offset into a table) stops the conversion
with one line: the paged forward has one position per token, not one length per batch.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from converter.context import ConversionContext
from converter.cst_helpers import code, dotted, flat_statements, names_read, nodes_of

CACHE_LENGTH_METHODS = {"get_seq_length"}
NAME = "positions"
HINT = (
    "the paged forward has each token's position in its sequence (`positions`), not one "
    "cache length per batch; extend converter/passes/flatten/positions.py"
)


def _length_call(node: cst.CSTNode) -> bool:
    return any(
        isinstance(c.func, cst.Attribute) and c.func.attr.value in CACHE_LENGTH_METHODS
        for c in nodes_of(node, cst.Call)
    )


def _single_assign(small: cst.CSTNode) -> tuple[str, cst.BaseExpression] | None:
    if m.matches(small, m.Assign([m.AssignTarget(m.Name())])):
        return small.targets[0].target.value, small.value
    if m.matches(small, m.AnnAssign(target=m.Name())) and small.value is not None:
        return small.target.value, small.value
    return None


def _lengths(forward: cst.FunctionDef) -> set[str]:
    """Locals bound to a cache length: computed by one, or rebinding one from itself
    (``past = past.clone() if ... else past``)."""
    found: set[str] = set()
    for small in flat_statements(forward.body.body):
        bound = _single_assign(small)
        if bound is not None and (
            _length_call(bound[1]) or (bound[0] in found and bound[0] in names_read(bound[1]))
        ):
            found.add(bound[0])
    return found


def _read(small: cst.BaseSmallStatement) -> cst.CSTNode:
    """What a small statement reads (an assignment: its value)."""
    if isinstance(small, cst.Assign | cst.AnnAssign | cst.AugAssign) and small.value is not None:
        return small.value
    return small


def _token_counts(forward: cst.FunctionDef) -> tuple[str | None, set[str]]:
    """The forward's input (first parameter after self) and the locals bound to its token
    axis (``s = x.shape[1]``, ``b, s, _ = x.size()``)."""
    params = [p.name.value for p in forward.params.params[1:]]
    hidden = params[0] if params else None
    names: set[str] = set()
    for small in flat_statements(forward.body.body):
        bound = _single_assign(small)
        if bound is not None and _is_token_axis(bound[1], hidden, set()):
            names.add(bound[0])
        elif m.matches(small, m.Assign([m.AssignTarget(m.Tuple())])):
            elements = small.targets[0].target.elements
            whole = m.Attribute(m.Name(hidden or ""), m.Name("shape")) | m.Call(
                m.Attribute(m.Name(hidden or ""), m.Name("size")), args=[]
            )
            if len(elements) >= 2 and m.matches(small.value, whole):
                if isinstance(elements[1].value, cst.Name):
                    names.add(elements[1].value.value)
    return hidden, names


def _is_token_axis(node: cst.BaseExpression, hidden: str | None, names: set[str]) -> bool:
    """``<hidden>.shape[1]``, ``<hidden>.size(1)`` or a local bound to one."""
    if hidden is None:
        return False
    one = m.Integer("1")
    shape = m.Subscript(
        m.Attribute(m.Name(hidden), m.Name("shape")), [m.SubscriptElement(m.Index(one))]
    )
    size = m.Call(m.Attribute(m.Name(hidden), m.Name("size")), args=[m.Arg(one)])
    return m.matches(node, shape | size) or (isinstance(node, cst.Name) and node.value in names)


def _arange(node: cst.BaseExpression) -> cst.Call | None:
    if isinstance(node, cst.Call) and dotted(node.func) in ("torch.arange", "arange"):
        return node
    return None


class _Rewrite(cst.CSTTransformer):
    """The position idioms of one forward -> ``positions[0]``."""

    def __init__(self, ctx, scope: str, lengths: set[str], hidden, counts: set[str]) -> None:
        self.ctx, self.scope = ctx, scope
        self.lengths, self.hidden, self.counts = lengths, hidden, counts
        self.count = 0
        self.stmt: cst.CSTNode | None = None

    def visit_SimpleStatementLine(self, node) -> None:
        self.stmt = node

    def _length(self, node: cst.BaseExpression) -> bool:
        return _length_call(node) or bool(names_read(node) & self.lengths)

    def _tokens(self, node: cst.BaseExpression) -> None:
        if not _is_token_axis(node, self.hidden, self.counts):
            raise self.ctx.error(
                f"positions counted over `{code(node)}` plus the KV cache's length: "
                f"not the token axis of `{self.hidden or 'the input'}` (x.shape[1])",
                self.stmt,
                scope=self.scope,
                hint=HINT,
            )

    def _positions(self) -> cst.BaseExpression:
        self.count += 1
        return cst.parse_expression(f"{NAME}[0]")

    def leave_BinaryOperation(self, original, updated):
        if not isinstance(updated.operator, cst.Add):
            return updated
        for ar, other in ((updated.left, updated.right), (updated.right, updated.left)):
            call = _arange(ar)
            if call is not None and self._length(other) and not self._length(call):
                count = [a for a in call.args if a.keyword is None]
                if len(count) != 1 or any(
                    a.keyword.value not in ("device", "dtype") for a in call.args if a.keyword
                ):
                    return updated
                self._tokens(count[0].value)
                return self._positions().with_changes(lpar=updated.lpar, rpar=updated.rpar)
        return updated

    def leave_Call(self, original, updated):
        call = _arange(updated)
        positional = [a.value for a in updated.args if a.keyword is None] if call else []
        if len(positional) != 2 or not self._length(positional[0]):
            return updated
        start, stop = positional
        if not isinstance(stop, cst.BinaryOperation) or not isinstance(stop.operator, cst.Add):
            return updated
        same = code(start).strip()
        for a, b in ((stop.left, stop.right), (stop.right, stop.left)):
            if code(a).strip() == same:
                self._tokens(b)
                return self._positions()
        return updated


def rewrite(
    ctx: ConversionContext, forwards: dict[str, cst.FunctionDef]
) -> dict[str, cst.FunctionDef]:
    """The forwards (of classes below the stack) whose position idioms now read
    ``positions``; a cache length read any other way stops the conversion."""
    out = {}
    for cls, forward in forwards.items():
        lengths = _lengths(forward)
        if not lengths and not _length_call(forward.body):
            continue
        scope = f"{cls}.forward"
        hidden, counts = _token_counts(forward)
        rewriter = _Rewrite(ctx, scope, lengths, hidden, counts)
        new = forward.visit(rewriter)
        _check_no_length_left(ctx, new, _lengths(new), scope)
        if rewriter.count:
            _check_name_free(ctx, new, scope)
            out[cls] = new
    return out


def _check_no_length_left(ctx, forward: cst.FunctionDef, lengths: set[str], scope: str) -> None:
    """Only the bindings of cache lengths may still read one (dead stores once the idioms
    are rewritten); anything else would compute with a length the paged forward lacks."""
    for stmt in nodes_of(forward.body, cst.SimpleStatementLine):
        for small in stmt.body:
            bound = _single_assign(small)
            if bound is not None and bound[0] in lengths:
                continue
            if _length_call(_read(small)) or names_read(_read(small)) & lengths:
                raise ctx.error("reads the KV cache's length", stmt, scope=scope, hint=HINT)
    for node in [*nodes_of(forward.body, cst.If), *nodes_of(forward.body, cst.While)]:
        if _length_call(node.test) or names_read(node.test) & lengths:
            raise ctx.error("branches on the KV cache's length", node, scope=scope, hint=HINT)


def _check_name_free(ctx, forward: cst.FunctionDef, scope: str) -> None:
    """``positions`` becomes a parameter: the forward may bind it only as the result of
    the rewritten idiom (``positions = positions[0]``), after reading it there."""
    for small in flat_statements(forward.body.body):
        bound = _single_assign(small)
        if bound is not None and bound[0] == NAME:
            if not m.matches(bound[1], m.Subscript(m.Name(NAME))):
                raise ctx.error(
                    f"binds `{NAME}`, the name the step's token positions are passed as",
                    small,
                    scope=scope,
                    hint="extend converter/passes/flatten/positions.py to pick a fresh name",
                )
