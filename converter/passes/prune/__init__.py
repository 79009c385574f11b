"""Stage prune: remove everything that depends on removed inputs — by dataflow.

Forward sweep (callers before callees): a removed parameter, or one no call site passes
(default None), is DEAD; conditions are partially evaluated (`converter.analysis.dataflow`); a
statement that still reads a DEAD name goes and its targets become DEAD; keyword (and,
once bound, positional) arguments with DEAD values are dropped at call sites.
Backward sweep (callees first): dead stores go, then parameters nothing reads, together
with the arguments bound to them at every call site — which is how masks, caches and
output plumbing fall away once the attention sink stopped reading them.

Fails loudly instead of producing a model that computes nothing: deleting a statement
that writes a name the function returns, deleting a return, or emptying a loop.
"""

from __future__ import annotations

from collections import Counter

import libcst as cst
import libcst.matchers as m

from converter.analysis import callgraph as cg
from converter.analysis.dataflow import (
    DEAD,
    HOLDS_NONE,
    MAYBE_NONE,
    NONNONE,
    UNKNOWN,
    Env,
    reads_dead,
    truth,
    value,
)
from converter.analysis.liveness import eliminate_dead_stores
from converter.context import ConversionContext
from converter.cst_helpers import names_read, nodes_of, target_names
from converter.passes.prune import unreachable
from converter.passes.prune.calls import Simplify, binds, drop_bound, entry_env, params_prunable
from converter.passes.select import shake


class _Pruner:
    def __init__(self, ctx: ConversionContext, fn: cg.Function, funcs, facts) -> None:
        self.ctx, self.fn, self.funcs, self.facts = ctx, fn, funcs, facts
        self.loops = cg.loop_layers(ctx, fn.cls, fn.node)
        returns = nodes_of(fn.node.body, cst.Return)
        self.chain = set().union(*(names_read(r.value) for r in returns if r.value is not None)) - {
            "self",
            "None",
        }

    def fail(self, what: str, node: cst.CSTNode, dead: list[str]):
        return self.ctx.error(
            f"pruning would {what}: it reads removed value(s) {sorted(set(dead))}",
            node,
            scope=self.fn.qualname,
            hint="a conversion must not compute nothing; extend converter/passes/prune/ or the flatten/attention passes",
        )

    def block(self, stmts, env: Env) -> list[cst.BaseStatement]:
        out: list[cst.BaseStatement] = []
        for stmt in stmts:
            out += self.statement(stmt, env)
        return out

    def statement(self, stmt, env: Env) -> list[cst.BaseStatement]:
        if isinstance(stmt, cst.SimpleStatementLine):
            body = [s for s in (self.small(s, env, stmt) for s in stmt.body) if s is not None]
            return [stmt.with_changes(body=body)] if body else []
        if isinstance(stmt, cst.If):
            return self.if_(stmt, env)
        if isinstance(stmt, (cst.For, cst.While)):
            return self.loop(stmt, env)
        if isinstance(stmt, (cst.FunctionDef, cst.ClassDef)):
            env.values[stmt.name.value] = NONNONE  # a nested def / class binds its name
            return [stmt]
        if isinstance(stmt, cst.With):
            for item in stmt.items:
                for name in binds(item):
                    env.values[name] = UNKNOWN
            body = self.block(stmt.body.body, env) or [_pass()]
            return [stmt.with_changes(body=stmt.body.with_changes(body=body))]
        # try/except and the rest are kept verbatim; what they bind is unknown, not dead
        for name in binds(stmt):
            env.values[name] = UNKNOWN
        return [stmt]

    def small(self, small, env: Env, line) -> cst.BaseSmallStatement | None:
        if isinstance(small, (cst.Import, cst.ImportFrom)):
            for name in binds(small):
                env.values[name] = NONNONE
            return small
        small = small.visit(Simplify(self, env))
        if isinstance(small, cst.Return) and isinstance(small.value, cst.Tuple):
            elements = [
                e.with_changes(value=cst.Name("None"))
                if isinstance(e.value, cst.Name) and env.get(e.value.value) == DEAD
                else e
                for e in small.value.elements
            ]
            small = small.with_changes(value=small.value.with_changes(elements=elements))
        reads = (
            [small.value]
            if isinstance(small, (cst.Assign, cst.AnnAssign, cst.AugAssign))
            and small.value is not None
            else [small]
        )
        if isinstance(small, cst.Assign):
            reads += [
                t.target for t in small.targets if not isinstance(t.target, (cst.Name, cst.Tuple))
            ]
        if isinstance(small, cst.AugAssign):
            reads.append(small.target)
        dead = [d for r in reads for d in reads_dead(r, env)]
        targets = _targets(small)
        if dead:
            if isinstance(small, cst.Return):
                raise self.fail("delete a return", line, dead)
            if targets & self.chain:
                raise self.fail(
                    f"delete the statement computing {sorted(targets & self.chain)}", line, dead
                )
            for name in targets:
                env.values[name] = DEAD
            return None
        if isinstance(small, (cst.Assign, cst.AnnAssign)) and small.value is not None:
            v = value(small.value, env)
            for t in (
                [t.target for t in small.targets]
                if isinstance(small, cst.Assign)
                else [small.target]
            ):
                if isinstance(t, cst.Name):
                    env.values[t.value] = v
                elif m.matches(t, m.Subscript(value=m.Name())) and (
                    v in (DEAD, MAYBE_NONE) or env.get(t.value.value) == HOLDS_NONE
                ):
                    env.values[t.value.value] = HOLDS_NONE  # its items may be None
                else:
                    for name in target_names(t):
                        env.values[name] = UNKNOWN
        elif isinstance(small, cst.AugAssign):
            for name in targets:
                env.values[name] = UNKNOWN
        return small

    def if_(self, stmt: cst.If, env: Env) -> list[cst.BaseStatement]:
        test = stmt.test.visit(Simplify(self, env))
        t = truth(test, env)
        if t is True:
            return self.block(stmt.body.body, env)
        if t is False:
            orelse = stmt.orelse
            if orelse is None:
                return []
            return (
                self.if_(orelse, env)
                if isinstance(orelse, cst.If)
                else self.block(orelse.body.body, env)
            )
        dead = reads_dead(test, env)
        if dead:
            writes = set().union(*(_targets(s) for s in nodes_of(stmt, cst.Assign, cst.AugAssign)))
            if writes & self.chain or nodes_of(stmt, cst.Return):
                raise self.fail("delete a branch that computes the returned value", stmt, dead)
            return []
        env_a, env_b = env.copy(), env.copy()
        body = self.block(stmt.body.body, env_a)
        orelse = stmt.orelse
        new_orelse = None
        if isinstance(orelse, cst.If):
            branch = self.if_(orelse, env_b)
            new_orelse = (
                branch[0]
                if len(branch) == 1 and isinstance(branch[0], cst.If)
                else (cst.Else(cst.IndentedBlock(branch)) if branch else None)
            )
        elif orelse is not None:
            rest = self.block(orelse.body.body, env_b)
            new_orelse = (
                orelse.with_changes(body=orelse.body.with_changes(body=rest)) if rest else None
            )
        env.merge_from(env_a, env_b)
        if not body and new_orelse is None:
            return []
        return [
            stmt.with_changes(
                test=test, body=stmt.body.with_changes(body=body or [_pass()]), orelse=new_orelse
            )
        ]

    def loop(self, stmt, env: Env) -> list[cst.BaseStatement]:
        head = stmt.iter if isinstance(stmt, cst.For) else stmt.test
        dead = reads_dead(head, env)
        if dead:
            raise self.fail("delete a loop", stmt, dead)
        if isinstance(stmt, cst.For):
            for name in target_names(stmt.target):
                env.values[name] = UNKNOWN
        inner = env.copy()
        body = self.block(stmt.body.body, inner)
        env.merge_from(env, inner)
        if not body:
            raise self.fail("empty a loop body", stmt, [])
        return [stmt.with_changes(body=stmt.body.with_changes(body=body))]


def _pass() -> cst.SimpleStatementLine:
    return cst.SimpleStatementLine([cst.Pass()])


def _targets(small: cst.CSTNode) -> set[str]:
    if isinstance(small, cst.Assign):
        return {n for t in small.targets for n in target_names(t.target)}
    if isinstance(small, (cst.AnnAssign, cst.AugAssign)):
        return set(target_names(small.target))
    return set()


def run(module: cst.Module, ctx: ConversionContext) -> cst.Module:
    funcs = cg.collect(module)
    roots = [f"{ctx.lm_class}.forward", f"{ctx.lm_class}.compute_logits"]
    order = cg.reachable(ctx, funcs, roots)
    facts: dict[str, dict] = {}
    for q in order:
        fn = funcs[q]
        pruner = _Pruner(ctx, fn, funcs, facts)
        env = entry_env(ctx, fn, facts.get(q), q in roots)
        body = pruner.block(fn.node.body.body, env) or [_pass()]
        funcs[q] = cg.Function(
            q, fn.cls, fn.node.with_changes(body=fn.node.body.with_changes(body=body))
        )
    callers: dict[str, list[str]] = {q: [] for q in order}
    shared: set[str] = set()  # callees of a call that may run one of several forwards
    for c in order:
        pairs = cg.calls_of(ctx, funcs[c], funcs)
        for t in {t for _, t in pairs}:
            callers.setdefault(t, []).append(c)
        per_call = Counter(id(call) for call, _ in pairs)
        shared |= {t for call, t in pairs if per_call[id(call)] > 1}
    refs = Counter(n.value for n in nodes_of(module, cst.Name))
    direct = Counter(
        c.func.value for c in nodes_of(module, cst.Call) if isinstance(c.func, cst.Name)
    )
    for q in reversed(order):
        fn = funcs[q]
        node = eliminate_dead_stores(fn.node)
        funcs[q] = fn = cg.Function(q, fn.cls, node)
        if q in roots or q in shared or not params_prunable(fn, refs, direct):
            continue  # (a shared callee's parameters stay: its calls bind every class)
        used = names_read(node.body)
        unused = [p.name.value for p in cg.params_of(fn) if p.name.value not in used]
        if not unused:
            continue
        ctx.removed_params.setdefault(q, [])
        ctx.removed_params[q] += unused
        keep = [p for p in node.params.params if p.name.value not in unused]
        keep = [p.with_changes(comma=cst.MaybeSentinel.DEFAULT) for p in keep]
        old = fn
        funcs[q] = cg.Function(
            q, fn.cls, node.with_changes(params=node.params.with_changes(params=keep))
        )
        for caller in callers[q]:
            funcs[caller] = drop_bound(ctx, funcs[caller], q, set(unused), funcs, old)
    reachable = set(order)
    return unreachable.run(_rebuild(module, ctx, funcs, reachable), ctx)


def _rebuild(module: cst.Module, ctx: ConversionContext, funcs, reachable: set[str]) -> cst.Module:
    # torch.autograd.Function subclasses run through `Cls.apply(...)` (Bloom's GeLUFunction)
    applied = {
        a.value.value
        for a in nodes_of(module, cst.Attribute)
        if a.attr.value == "apply" and isinstance(a.value, cst.Name)
    }
    body = []
    for stmt in module.body:
        if isinstance(stmt, cst.FunctionDef) and stmt.name.value in funcs:
            stmt = funcs[stmt.name.value].node
        elif isinstance(stmt, cst.ClassDef):
            inner = []
            for s in stmt.body.body:
                if isinstance(s, cst.FunctionDef):
                    q = f"{stmt.name.value}.{s.name.value}"
                    if (
                        s.name.value == "forward"
                        and q not in reachable
                        and stmt.name.value not in applied
                    ):
                        continue  # a container whose forward nothing calls (OPTModel)
                    s = funcs[q].node if q in funcs else s
                inner.append(s)
            stmt = stmt.with_changes(body=stmt.body.with_changes(body=inner or [_pass()]))
        body.append(stmt)
    return shake(module.with_changes(body=body), {ctx.lm_class})
