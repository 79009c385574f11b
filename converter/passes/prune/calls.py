"""Call sites for the pruner: arguments bound to callee parameters, then dropped.

`Simplify` folds one statement's expressions (``a if c else b`` with a decided ``c``)
and, at every call, drops the arguments that carry removed values, recording what each
callee parameter receives (the callee's entry facts). Positional arguments after a
dropped one become keywords, so nothing shifts. `drop_bound` removes, at every call of a
callee, the arguments bound to parameters the callee lost.
"""

from __future__ import annotations

from collections import Counter

import libcst as cst

from converter.analysis import callgraph as cg
from converter.analysis.dataflow import (
    DEAD,
    NONNONE,
    UNKNOWN,
    Env,
    const,
    literal,
    merge,
    reads_dead,
    truth,
    value,
)
from converter.context import ConversionContext
from converter.cst_helpers import code, nodes_of


def rebuild_args(bound: list[tuple[str | None, cst.Arg]], drop: set[int]) -> list[cst.Arg]:
    """Arguments minus `drop`; positionals after a dropped positional become keywords."""
    out: list[cst.Arg] = []
    keywordize = False
    for i, (param, arg) in enumerate(bound):
        positional = arg.keyword is None and not arg.star
        if i in drop:
            keywordize = keywordize or positional
            continue
        if positional and keywordize and param is not None and not param.startswith("*"):
            arg = arg.with_changes(
                keyword=cst.Name(param),
                equal=cst.AssignEqual(
                    whitespace_before=cst.SimpleWhitespace(""),
                    whitespace_after=cst.SimpleWhitespace(""),
                ),
            )
        out.append(arg)
    if out:
        out[-1] = out[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
    return out


class Simplify(cst.CSTTransformer):
    """Expression-level folding inside one statement, recording call-site facts."""

    def __init__(self, pruner, env: Env) -> None:
        self.p, self.env = pruner, env

    def leave_IfExp(self, original, updated):
        t = truth(updated.test, self.env)
        return updated if t is None else (updated.body if t else updated.orelse)

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        target = cg.resolve(self.p.ctx, self.p.fn, updated, self.p.funcs, self.p.loops)
        callee = self.p.funcs.get(target) if target else None
        bound = cg.bind(updated, callee) if callee is not None else None
        if bound is None:  # external callee: drop dead keyword / ** arguments
            args = [
                a
                for a in updated.args
                if (a.keyword is None and a.star != "**") or not reads_dead(a.value, self.env)
            ]
            return updated.with_changes(args=rebuild_args([(None, a) for a in args], set()))
        stripped = target in self.p.ctx.kwargs_stripped
        drop = set()
        facts = self.p.facts.setdefault(target, {})
        passed = {}
        for i, (param, arg) in enumerate(bound):
            if reads_dead(arg.value, self.env) or (
                param is None and (stripped or arg.star == "**")
            ):
                drop.add(i)
                if param is not None:
                    passed[param] = DEAD
            elif param is not None:
                v = value(arg.value, self.env)
                passed[param] = (
                    NONNONE
                    if v == UNKNOWN
                    and not isinstance(arg.value, cst.Call)
                    and not isinstance(arg.value, cst.Attribute)
                    else v
                )
            elif not stripped:
                raise self.p.ctx.error(
                    f"argument {code(arg).strip(', ')} matches no parameter of {target}",
                    updated,
                    scope=self.p.fn.qualname,
                )
        _record_facts(facts, callee, passed)
        for alt in cg.alternatives(self.p.ctx, self.p.fn, updated, self.p.funcs):
            alt_bound = cg.bind(updated, self.p.funcs[alt]) if alt != target else None
            if alt_bound is not None:  # what the same arguments pass to the other class
                alt_passed = {p: passed.get(q, UNKNOWN) for (p, _), (q, _) in zip(alt_bound, bound)}
                _record_facts(self.p.facts.setdefault(alt, {}), self.p.funcs[alt], alt_passed)
        return updated.with_changes(args=rebuild_args(bound, drop))


def _record_facts(facts: dict, callee: cg.Function, passed: dict) -> None:
    for param in cg.params_of(callee):
        name = param.name.value
        v = passed.get(name, literal(param.default) if param.default is not None else UNKNOWN)
        facts[name] = merge(facts[name], v) if name in facts else v


def params_prunable(fn: cg.Function, refs: Counter, direct: Counter) -> bool:
    """Methods called through instances (forward) and functions only ever called."""
    if fn.cls is not None:
        return fn.node.name.value == "forward"
    return refs[fn.qualname] == direct[fn.qualname] + 1  # + its own def name


def drop_bound(
    ctx, caller: cg.Function, callee_q: str, removed: set[str], funcs, callee
) -> cg.Function:
    """Drop, at `caller`'s calls of `callee_q`, the arguments bound to `removed` (bound
    against `callee`, the signature before the removal)."""
    loops = cg.loop_layers(ctx, caller.cls, caller.node)

    class _Drop(cst.CSTTransformer):
        def leave_Call(self, orig, updated):
            if cg.resolve(ctx, caller, updated, funcs, loops) != callee_q:
                return updated
            bound = cg.bind(updated, callee)
            if bound is None:
                return updated
            drop = {i for i, (p, _) in enumerate(bound) if p in removed}
            return updated.with_changes(args=rebuild_args(bound, drop))

    return cg.Function(caller.qualname, caller.cls, caller.node.visit(_Drop()))


def _all_params(node: cst.FunctionDef) -> list[cst.Param]:
    p = node.params
    stars = [x for x in (p.star_arg, p.star_kwarg) if isinstance(x, cst.Param)]
    return [*p.posonly_params, *p.params, *p.kwonly_params, *stars]


def binds(node: cst.CSTNode) -> set[str]:
    """Names a statement (at any depth, comprehensions and lambdas aside) binds."""
    names: set[str] = set()
    kinds = (
        cst.AssignTarget,
        cst.For,
        cst.NamedExpr,
        cst.AnnAssign,
        cst.AugAssign,
        cst.FunctionDef,
        cst.ClassDef,
        cst.AsName,
        cst.ImportAlias,
    )
    for sub in nodes_of(node, *kinds):
        if isinstance(sub, (cst.FunctionDef, cst.ClassDef)):
            names.add(sub.name.value)
        elif isinstance(sub, cst.ImportAlias):
            if sub.asname is None:
                names.add(code(sub.name).split(".")[0])
        else:
            target = sub.name if isinstance(sub, cst.AsName) else sub.target
            names |= {n.value for n in nodes_of(target, cst.Name)}
    return names


def _locals(fn: cg.Function) -> tuple[set[str], set[str]]:
    """(names the function binds, names bound only inside comprehensions / lambdas)."""
    names = {p.name.value for p in _all_params(fn.node)} | binds(fn.node.body)
    scoped: set[str] = set()
    for node in nodes_of(fn.node.body, cst.CompFor, cst.Lambda):
        if isinstance(node, cst.Lambda):
            scoped |= {p.name.value for p in node.params.params}
        else:
            scoped |= {n.value for n in nodes_of(node.target, cst.Name)}
    return names, scoped - names


def entry_env(ctx: ConversionContext, fn: cg.Function, facts: dict | None, root: bool) -> Env:
    local, scoped = _locals(fn)
    env = Env(local, ctx.module_symbols, scoped)
    for param in _all_params(fn.node):
        name = param.name.value
        env.values[name] = NONNONE if root or name == "self" else (facts or {}).get(name, UNKNOWN)
    for name in ctx.removed_params.get(fn.qualname, []):
        env.values[name] = DEAD
    # API flags with a fixed inference value (rules/training.toml [flags]), e.g.
    # return_dict: generated code returns tensors, so the tuple-output paths go.
    flags = ctx.rules.get("training", {}).get("flags", {})
    for fixed in (True, False):
        for name in flags.get(str(fixed).lower(), []):
            env.values[name] = const(fixed)
    return env
