"""Head counts under tensor parallelism.

The `PagedAttention` ctor of an attention class states the total head counts; under
TP each rank runs `local_num_heads(total)` query heads and `local_num_kv_heads(total)`
KV heads (KV heads replicate when the TP size exceeds them). `__init__` keeps totals
(parallel layers take full sizes); every other method of the class reads the head-count
expressions, and their `self.X` aliases, through the `local_*` functions.
"""

from __future__ import annotations

import libcst as cst

from converter.cst_helpers import code, dotted, one_line, self_attr

PA_ATTR = "attn"  # the attention pass's `self.attn = PagedAttention(...)`
PER_HEAD_CALL_ARGS = ("sinks",)  # [H] tensors of PagedAttention.forward


def _wrap(fn: str, node: cst.BaseExpression, flag: str | None = None) -> cst.Call:
    """`fn(node)`, or `fn(node, <flag>)` where the config decides whether heads shard."""
    args = [cst.Arg(node)] + ([cst.Arg(cst.parse_expression(flag))] if flag else [])
    return cst.Call(func=cst.Name(fn), args=args)


def _head_block(node: cst.BaseExpression, flag: str | None) -> tuple[cst.BaseExpression, set]:
    """This rank's contiguous block of a per-query-head tensor, and the names it uses
    (`local_head_block` keeps a None as None: sinks only some layers have)."""
    return _wrap("local_head_block", node, flag), {"local_head_block"}


class HeadCounts(cst.CSTTransformer):
    """Wraps reads of head-count expressions in methods other than ``__init__``."""

    def __init__(self, heads: set[str], kv_heads: set[str], flag: str | None = None) -> None:
        self.heads, self.kv_heads, self.flag = heads, kv_heads, flag
        self.used: set[str] = set()

    def leave_Attribute(
        self, original: cst.Attribute, updated: cst.Attribute
    ) -> cst.BaseExpression:
        text = code(original)
        fn = (
            "local_num_heads"
            if text in self.heads
            else "local_num_kv_heads"
            if text in self.kv_heads
            else None
        )
        if fn is None:
            return updated
        self.used.add(fn)
        return _wrap(fn, updated, self.flag)

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        """Per-query-head tensors passed to the paged attention call (``sinks=``, the
        model's full parameter): this rank's contiguous block of heads, as for ALiBi."""
        if dotted(updated.func) != f"self.{PA_ATTR}":
            return updated
        args = list(updated.args)
        for i, arg in enumerate(args):
            if arg.keyword is not None and arg.keyword.value in PER_HEAD_CALL_ARGS:
                value, used = _head_block(arg.value, self.flag)
                self.used |= used
                args[i] = arg.with_changes(value=value)
        return updated.with_changes(args=args)


def _equivalents(text: str) -> set[str]:
    """`config.x` and `self.config.x` name the same value inside a module."""
    out = {text}
    if text.startswith("config."):
        out.add("self." + text)
    if text.startswith("self.config."):
        out.add(text[len("self.") :])
    return out


def head_expressions(init: cst.FunctionDef, seed: str | None) -> set[str]:
    """The PA ctor's head-count expression plus every `self.X` aliasing it in __init__."""
    if seed is None:
        return set()
    found = _equivalents(one_line(cst.parse_expression(f"({seed})")))
    assigns = []
    for line in init.body.body:
        for small in line.body if isinstance(line, cst.SimpleStatementLine) else []:
            if isinstance(small, cst.Assign) and len(small.targets) == 1:
                attr = self_attr(small.targets[0].target)
                if attr:
                    assigns.append((f"self.{attr}", one_line(small.value)))
    changed = True
    while changed:
        changed = False
        for target, value in assigns:
            if (value in found) != (target in found):
                found |= _equivalents(value) | {target}
                changed = True
    return found


def paged_attention_call(init: cst.FunctionDef) -> cst.Call | None:
    for line in init.body.body:
        for small in line.body if isinstance(line, cst.SimpleStatementLine) else []:
            if isinstance(small, cst.Assign) and isinstance(small.value, cst.Call):
                if (dotted(small.value.func) or "").endswith("PagedAttention"):
                    return small.value
    return None


def pa_args(call: cst.Call) -> dict[str, str]:
    """PagedAttention(num_heads, head_dim, scale, num_kv_heads=...) as {name: code}."""
    names = ["num_heads", "head_dim", "scale", "num_kv_heads"]
    out = {}
    for i, arg in enumerate(call.args):
        key = arg.keyword.value if arg.keyword else names[i]
        out[key] = code(arg.value)
    return out


class _AlibiSlopes(cst.CSTTransformer):
    """``Alibi(slopes, ...)``: one slope per query head, [H]; this rank's contiguous block."""

    def __init__(self, flag: str | None) -> None:
        self.flag, self.used = flag, set()

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        if dotted(updated.func) != "Alibi" or not updated.args:
            return updated
        value, self.used = _head_block(updated.args[0].value, self.flag)
        return updated.with_changes(
            args=[updated.args[0].with_changes(value=value), *updated.args[1:]]
        )


class WrapPagedAttention(cst.CSTTransformer):
    def __init__(self, flag: str | None = None) -> None:
        self.used: set[str] = set()
        self.flag = flag  # `self.<attr>` where the config decides whether heads shard

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        if not (dotted(updated.func) or "").endswith("PagedAttention"):
            return updated
        args = list(updated.args)
        for i, arg in enumerate(args):
            key = arg.keyword.value if arg.keyword else ("num_heads" if i == 0 else None)
            fn = {"num_heads": "local_num_heads", "num_kv_heads": "local_num_kv_heads"}.get(
                key or ""
            )
            if fn:
                self.used.add(fn)
                args[i] = arg.with_changes(value=_wrap(fn, arg.value, self.flag))
            elif key == "alibi":
                slopes = _AlibiSlopes(self.flag)
                args[i] = arg.with_changes(value=arg.value.visit(slopes))
                self.used |= slopes.used
        return updated.with_changes(args=args)
