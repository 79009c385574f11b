"""Fusing separate column-parallel projections of one input (q/k/v, gate/up).

`plan_fusions` decides where fusion is safe: every member is a column-parallel
``nn.Linear`` of the same class with the same input size and bias, and ``forward``
calls each member exactly once, at the top level of its body, on the same name, which
nothing reassigns between the first and the last call. `split_statement` then
inserts ``q_proj_out, k_proj_out, v_proj_out = self.qkv_proj(x).split(...)`` before
the first call and replaces each ``self.q_proj(x)`` by its part.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from converter.context import ConversionContext
from converter.cst_helpers import code, find_all, methods_of, nodes_of, self_attr


@dataclass
class Fusion:
    cls: str
    kind: str  # "qkv" | "gate_up"
    members: list[str]  # ["q_proj", "k_proj", "v_proj"]
    fused: str  # "qkv_proj"
    shard_ids: list[object]  # ["q", "k", "v"] / [0, 1]
    in_: str
    outs: list[str]
    bias: str
    arg: str = ""  # the input name forward passes to every member


def _member_calls(fn: cst.CSTNode, attr: str) -> list[cst.Call]:
    return find_all(fn, lambda n: isinstance(n, cst.Call) and self_attr(n.func) == attr)


def _self_calls(node: cst.CSTNode) -> dict[str, list[cst.Call]]:
    """Every ``self.<attr>(...)`` call in `node`, by attr (one traversal)."""
    out: dict[str, list[cst.Call]] = {}
    for call in find_all(node, lambda n: isinstance(n, cst.Call) and self_attr(n.func) is not None):
        out.setdefault(self_attr(call.func), []).append(call)
    return out


def _assigned_names(stmt: cst.CSTNode) -> set[str]:
    names = set()
    for node in find_all(stmt, lambda n: isinstance(n, cst.AssignTarget | cst.AugAssign)):
        target = node.target
        for name in find_all(target, lambda n: isinstance(n, cst.Name)):
            names.add(name.value)
    return names


def _why_not(fn: cst.FunctionDef, members: list[str]) -> tuple[str | None, str]:
    """(reason fusion is unsafe or None, the shared argument name)."""
    body = list(fn.body.body)
    per_stmt = [_self_calls(s) for s in body]
    everywhere = _self_calls(fn)
    indices, args = [], set()
    for attr in members:
        calls = everywhere.get(attr, [])
        if len(calls) != 1 or len(calls[0].args) != 1 or calls[0].args[0].keyword:
            return f"self.{attr} is not called exactly once with one argument", ""
        arg = calls[0].args[0].value
        if not isinstance(arg, cst.Name):
            return f"self.{attr} is called on an expression, not a name", ""
        args.add(arg.value)
        indices.append(next(i for i, calls in enumerate(per_stmt) if attr in calls))
    if len(args) != 1:
        return f"members are called on different inputs {sorted(args)}", ""
    (arg,) = args
    first, last = min(indices), max(indices)
    for stmt in body[first:last]:
        if arg in _assigned_names(stmt):
            return f"{arg} is reassigned between the projections", ""
    return None, arg


def _linear_sig(call: cst.Call) -> tuple[str, str, str]:
    names = ["in", "out", "bias"]
    got = {}
    for i, a in enumerate(call.args):
        key = (
            {"in_features": "in", "out_features": "out"}.get(a.keyword.value, a.keyword.value)
            if a.keyword
            else names[i]
        )
        got[key] = code(a.value)
    return got.get("in", ""), got.get("out", ""), got.get("bias", "True")


def plan_fusions(
    module: cst.Module, ctx: ConversionContext, decisions: dict
) -> dict[str, list[Fusion]]:
    groups = ctx.rules.get("tp", {}).get("fuse", {})
    shard_ids = {"qkv": ["q", "k", "v"], "gate_up": [0, 1]}
    out: dict[str, list[Fusion]] = {}
    candidates = {m for lists in groups.values() for names in lists for m in names[:-1]}
    for stmt in module.body:
        if not isinstance(stmt, cst.ClassDef):
            continue
        cls = stmt.name.value
        info = ctx.classes.get(cls)
        if info is None or len(candidates & set(info.children)) < 2:
            continue  # cheap filter before any traversal
        methods = methods_of(stmt)
        init, forward = methods.get("__init__"), methods.get("forward")
        if init is None or forward is None:
            continue
        ctors: dict[str, cst.Call] = {}
        for line in init.body.body:
            for small in line.body if isinstance(line, cst.SimpleStatementLine) else []:
                if isinstance(small, cst.Assign) and isinstance(small.value, cst.Call):
                    attr = self_attr(small.targets[0].target)
                    if attr:
                        ctors.setdefault(attr, small.value)
        has_attention = any("PagedAttention" in code(c.func) for c in ctors.values())
        for kind, lists in groups.items():
            for names in lists:
                members, fused = names[:-1], names[-1]
                if not all(
                    decisions.get((cls, m)) and decisions[(cls, m)].style == "colwise"
                    for m in members
                ):
                    continue
                if (kind == "qkv" and not has_attention) or not all(m in ctors for m in members):
                    continue
                if fused in ctors:
                    ctx.log.append(f"tp: {cls}: not fusing {members}: {fused} already exists")
                    continue
                sigs = [_linear_sig(ctors[m]) for m in members]
                if len({s[0] for s in sigs}) != 1 or len({s[2] for s in sigs}) != 1:
                    ctx.log.append(f"tp: {cls}: not fusing {members}: different inputs or bias")
                    continue
                if kind == "qkv" and sigs[1][1] != sigs[2][1]:
                    # QKVParallelLinear sizes V like K: a value head of its own size
                    # (MiMo-V2's v_head_dim) keeps separate column-parallel projections
                    ctx.log.append(f"tp: {cls}: not fusing {members}: k and v widths differ")
                    continue
                reason, arg = _why_not(forward, members)
                if reason:
                    ctx.log.append(f"tp: {cls}: not fusing {members}: {reason}")
                    continue
                out.setdefault(cls, []).append(
                    Fusion(
                        cls,
                        kind,
                        members,
                        fused,
                        shard_ids[kind],
                        sigs[0][0],
                        [s[1] for s in sigs],
                        sigs[0][2],
                        arg,
                    )
                )
    return out


class _ReplaceCalls(cst.CSTTransformer):
    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        attr = self_attr(original.func)
        return cst.Name(self.names[attr]) if attr in self.names else updated


def split_statement(fn: cst.FunctionDef, f: Fusion) -> cst.FunctionDef:
    """Insert the fused call before the first member's statement; members read its parts."""
    taken = {n.value for n in find_all(fn, lambda n: isinstance(n, cst.Name))}  # avoid clashes
    outs = {}
    for m in f.members:
        name = f"{m}_out"
        while name in taken:
            name += "_"
        outs[m] = name
    targets = ", ".join(outs[m] for m in f.members)
    if f.kind == "qkv":
        sizes = f"[self.{f.fused}.q_size, self.{f.fused}.kv_size, self.{f.fused}.kv_size]"
        text = f"{targets} = self.{f.fused}({f.arg}).split({sizes}, dim=-1)"
        comment = "# this rank's q/k/v heads from one fused matmul"
    else:
        text = f"{targets} = self.{f.fused}({f.arg}).chunk({len(f.members)}, dim=-1)"
        comment = "# this rank's slices of each projection from one fused matmul"
    new = cst.parse_statement(text)
    new = new.with_changes(
        trailing_whitespace=cst.TrailingWhitespace(
            whitespace=cst.SimpleWhitespace("  "), comment=cst.Comment(comment)
        )
    )
    body = list(fn.body.body)
    calls = [set(_self_calls(s)) for s in body]
    first = min(i for i, attrs in enumerate(calls) if attrs & set(f.members))
    replaced = [
        s.visit(_ReplaceCalls(outs)) if attrs & set(f.members) else s
        for s, attrs in zip(body, calls)
    ]
    replaced.insert(first, new)
    return fn.with_changes(body=fn.body.with_changes(body=replaced))


# methods of a tensor that keep its shape and layout (elementwise)
ELEMENTWISE = ("clamp", "clip", "to", "float", "contiguous", "type_as")


class LocalQKVSplit(cst.CSTTransformer):
    """``self.<qkv>(x)...split(sizes, dim=d)`` -> this rank's ``[q_size, kv_size, kv_size]``.

    A single linear holding [Q|K|V] (GPT-2's ``c_attn``) becomes a ``QKVParallelLinear``
    whose local output is [Q_r | K_r | V_r]; the source's split sizes (``split_size`` =
    the full hidden size) would cut it at the wrong places, the layer's own sizes do not.
    """

    def __init__(self, attr: str) -> None:
        self.attr = attr
        self.fed: set[str] = set()  # names holding the layer's output (``x = self.qkv(x)``)

    def _produces(self, node: cst.CSTNode) -> bool:
        return any(
            isinstance(c.func, cst.Attribute) and self_attr(c.func) == self.attr
            for c in nodes_of(node, cst.Call)
        ) or (isinstance(node, cst.Name) and node.value in self.fed)

    def _is_output(self, node: cst.CSTNode) -> bool:
        """The layer's output itself, or an elementwise function of it (DBRX's
        ``qkv.clamp(min=-clip, max=clip)``), which keeps its [Q|K|V] layout: a view or
        reshape of it (CodeGen's per-head ``self.qkv(x).view(..., 3 * d)``) cuts heads,
        not the fused [Q|K|V], and keeps the source's sizes."""
        if isinstance(node, cst.Call):
            func = node.func
            if isinstance(func, cst.Attribute) and func.attr.value in ELEMENTWISE:
                return self._is_output(func.value)
            return isinstance(func, cst.Attribute) and self_attr(func) == self.attr
        return isinstance(node, cst.Name) and node.value in self.fed

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        for target in original.targets:
            if isinstance(target.target, cst.Name):
                name = target.target.value
                (self.fed.add if self._is_output(original.value) else self.fed.discard)(name)
        return updated

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        func = updated.func
        if not (isinstance(func, cst.Attribute) and func.attr.value == "split"):
            return updated
        if (
            not self._produces(func.value)
            or not updated.args
            or updated.args[0].keyword is not None
        ):
            return updated
        layer = f"self.{self.attr}"
        sizes = cst.parse_expression(f"[{layer}.q_size, {layer}.kv_size, {layer}.kv_size]")
        return updated.with_changes(
            args=[updated.args[0].with_changes(value=sizes), *updated.args[1:]]
        )
