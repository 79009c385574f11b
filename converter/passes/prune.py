"""Pass 5, prune: remove everything that depends on removed inputs — by dataflow.

Forward sweep (callers before callees): a removed parameter, or one no call site passes
(default None), is DEAD; conditions are partially evaluated (`converter.dataflow`); a
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

from converter import callgraph as cg
from converter.analysis import nodes_of
from converter.context import ConversionContext
from converter.dataflow import DEAD, NONNONE, UNKNOWN, Env, literal, merge, reads_dead, truth, value
from converter.passes.liveness import eliminate_dead_stores
from converter.passes.select import names_read, shake

_EMPTY = cst.Module(body=[])


def _all_params(node: cst.FunctionDef) -> list[cst.Param]:
    p = node.params
    stars = [x for x in (p.star_arg, p.star_kwarg) if isinstance(x, cst.Param)]
    return [*p.posonly_params, *p.params, *p.kwonly_params, *stars]


def _locals(fn: cg.Function) -> tuple[set[str], set[str]]:
    """(names the function binds, names bound only inside comprehensions / lambdas)."""
    names = {p.name.value for p in _all_params(fn.node)}
    kinds = (
        cst.AssignTarget,
        cst.For,
        cst.NamedExpr,
        cst.AnnAssign,
        cst.AugAssign,
        cst.FunctionDef,
        cst.ClassDef,
        cst.CompFor,
        cst.Lambda,
    )
    scoped: set[str] = set()
    for node in nodes_of(fn.node.body, *kinds):
        if isinstance(node, (cst.FunctionDef, cst.ClassDef)):
            names.add(node.name.value)
        elif isinstance(node, cst.Lambda):
            scoped |= {p.name.value for p in node.params.params}
        elif isinstance(node, cst.CompFor):
            scoped |= {n.value for n in nodes_of(node.target, cst.Name)}
        elif isinstance(node.target, (cst.Tuple, cst.List)):
            names |= {n.value for n in nodes_of(node.target, cst.Name)}
        elif isinstance(node.target, cst.Name):
            names.add(node.target.value)
    return names, scoped - names


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


class _Simplify(cst.CSTTransformer):
    """Expression-level folding inside one statement, recording call-site facts."""

    def __init__(self, pruner: _Pruner, env: Env) -> None:
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
                    f"argument {_EMPTY.code_for_node(arg).strip(', ')} matches no parameter of {target}",
                    updated,
                    scope=self.p.fn.qualname,
                )
        for param in cg.params_of(callee):
            name = param.name.value
            v = passed.get(name, literal(param.default) if param.default is not None else UNKNOWN)
            facts[name] = merge(facts[name], v) if name in facts else v
        return updated.with_changes(args=rebuild_args(bound, drop))


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
            hint="a conversion must not compute nothing; extend converter/passes/prune.py or the flatten/attention passes",
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
            return [
                stmt.with_changes(
                    body=stmt.body.with_changes(body=self.block(stmt.body.body, env) or [_pass()])
                )
            ]
        return [stmt]

    def small(self, small, env: Env, line) -> cst.BaseSmallStatement | None:
        small = small.visit(_Simplify(self, env))
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
                else:
                    for name in _targets_of(t):
                        env.values[name] = UNKNOWN
        elif isinstance(small, cst.AugAssign):
            for name in targets:
                env.values[name] = UNKNOWN
        return small

    def if_(self, stmt: cst.If, env: Env) -> list[cst.BaseStatement]:
        test = stmt.test.visit(_Simplify(self, env))
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
            for name in _targets_of(stmt.target):
                env.values[name] = UNKNOWN
        inner = env.copy()
        body = self.block(stmt.body.body, inner)
        env.merge_from(env, inner)
        if not body:
            raise self.fail("empty a loop body", stmt, [])
        return [stmt.with_changes(body=stmt.body.with_changes(body=body))]


def _pass() -> cst.SimpleStatementLine:
    return cst.SimpleStatementLine([cst.Pass()])


def _targets_of(node: cst.CSTNode) -> set[str]:
    if isinstance(node, cst.Name):
        return {node.value}
    if isinstance(node, (cst.Tuple, cst.List)):
        return (
            set().union(*(_targets_of(e.value) for e in node.elements)) if node.elements else set()
        )
    return set()


def _targets(small: cst.CSTNode) -> set[str]:
    if isinstance(small, cst.Assign):
        return set().union(*(_targets_of(t.target) for t in small.targets))
    if isinstance(small, (cst.AnnAssign, cst.AugAssign)):
        return _targets_of(small.target)
    return set()


def _entry_env(ctx: ConversionContext, fn: cg.Function, facts: dict | None, root: bool) -> Env:
    local, scoped = _locals(fn)
    env = Env(local, ctx.module_symbols, scoped)
    for param in _all_params(fn.node):
        name = param.name.value
        env.values[name] = NONNONE if root or name == "self" else (facts or {}).get(name, UNKNOWN)
    for name in ctx.removed_params.get(fn.qualname, []):
        env.values[name] = DEAD
    return env


def run(module: cst.Module, ctx: ConversionContext) -> cst.Module:
    funcs = cg.collect(module)
    roots = [f"{ctx.lm_class}.forward", f"{ctx.lm_class}.compute_logits"]
    order = cg.reachable(ctx, funcs, roots)
    facts: dict[str, dict] = {}
    for q in order:
        fn = funcs[q]
        pruner = _Pruner(ctx, fn, funcs, facts)
        env = _entry_env(ctx, fn, facts.get(q), q in roots)
        body = pruner.block(fn.node.body.body, env) or [_pass()]
        funcs[q] = cg.Function(
            q, fn.cls, fn.node.with_changes(body=fn.node.body.with_changes(body=body))
        )
    callers: dict[str, list[str]] = {q: [] for q in order}
    for c in order:
        for t in {t for _, t in cg.calls_of(ctx, funcs[c], funcs)}:
            callers.setdefault(t, []).append(c)
    refs = Counter(n.value for n in nodes_of(module, cst.Name))
    direct = Counter(
        c.func.value for c in nodes_of(module, cst.Call) if isinstance(c.func, cst.Name)
    )
    for q in reversed(order):
        fn = funcs[q]
        node = eliminate_dead_stores(fn.node)
        funcs[q] = fn = cg.Function(q, fn.cls, node)
        if q in roots or not _params_prunable(fn, refs, direct):
            continue
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
            funcs[caller] = _drop_bound(ctx, funcs[caller], q, set(unused), funcs, old)
    reachable = set(order)
    return _rebuild(module, ctx, funcs, reachable)


def _params_prunable(fn: cg.Function, refs: Counter, direct: Counter) -> bool:
    """Methods called through instances (forward) and functions only ever called."""
    if fn.cls is not None:
        return fn.node.name.value == "forward"
    return refs[fn.qualname] == direct[fn.qualname] + 1  # + its own def name


def _drop_bound(
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


def _rebuild(module: cst.Module, ctx: ConversionContext, funcs, reachable: set[str]) -> cst.Module:
    body = []
    for stmt in module.body:
        if isinstance(stmt, cst.FunctionDef) and stmt.name.value in funcs:
            stmt = funcs[stmt.name.value].node
        elif isinstance(stmt, cst.ClassDef):
            inner = []
            for s in stmt.body.body:
                if isinstance(s, cst.FunctionDef):
                    q = f"{stmt.name.value}.{s.name.value}"
                    if s.name.value == "forward" and q not in reachable:
                        continue  # a container whose forward nothing calls (OPTModel)
                    s = funcs[q].node if q in funcs else s
                inner.append(s)
            stmt = stmt.with_changes(body=stmt.body.with_changes(body=inner or [_pass()]))
        body.append(stmt)
    return shake(module.with_changes(body=body), {ctx.lm_class})
