"""Dead-store elimination on one function body (backward liveness, loops to a fixpoint).

An assignment whose targets are all names nobody reads later goes, and so does a store
into a local container nobody reads later (``mapping[k] = v``). Attribute stores
(``self.x = ...``), stores into a parameter's container (the caller sees them: gemma3n's
``shared_kv_states[t] = k, v``) and expression statements stay: they have effects. An
``if`` or ``for`` whose body is left empty goes with its test or iterable (a loop whose
target is read after it stays).
"""

from __future__ import annotations

import libcst as cst

from converter.cst_helpers import names_read, target_names


def _name_targets(small) -> set[str] | None:
    """Names an assignment defines; None when it also has effect-ful targets."""
    targets = [t.target for t in small.targets] if isinstance(small, cst.Assign) else [small.target]
    out: set[str] = set()
    for t in targets:
        if isinstance(t, cst.Name):
            out.add(t.value)
        elif isinstance(t, (cst.Tuple, cst.List)) and all(
            isinstance(e.value, cst.Name) for e in t.elements
        ):
            out |= {e.value.value for e in t.elements}
        elif isinstance(t, cst.Subscript) and isinstance(t.value, cst.Name):
            # dead if the container is; `x[]` (live throughout for a parameter x) keeps
            # stores into a caller's container
            out |= {t.value.value, f"{t.value.value}[]"}
        else:
            return None
    return out


def _small(small, live: set[str]):
    """(kept small statement or None, live before it)."""
    if isinstance(small, (cst.Assign, cst.AnnAssign, cst.AugAssign)) and small.value is not None:
        targets = (
            [t.target for t in small.targets] if isinstance(small, cst.Assign) else [small.target]
        )
        defs = _name_targets(small)
        if defs is not None and not (defs & live):
            return None, live
        uses, kill = names_read(small.value), set()
        for t in targets:
            if isinstance(t, cst.Name):
                kill.add(t.value)
            elif isinstance(t, (cst.Tuple, cst.List)) and all(
                isinstance(e.value, cst.Name) for e in t.elements
            ):
                kill |= {e.value.value for e in t.elements}
            else:  # subscript / attribute stores read their base
                uses |= names_read(t)
        if isinstance(small, cst.AugAssign):
            uses |= names_read(small.target)
            kill = set()
        return small, (live - kill) | uses
    if isinstance(small, (cst.Return, cst.Raise)):
        # what the caller sees after any exit (its containers' `x[]`) stays live
        return small, names_read(small) | {n for n in live if n.endswith("[]")}
    return small, live | names_read(small)


def block(stmts, live: set[str], apply: bool) -> tuple[list, set[str]]:
    out = []
    for stmt in reversed(list(stmts)):
        new, live = statement(stmt, live, apply)
        if new is not None:
            out.append(new)
    return out[::-1], live


def statement(stmt, live: set[str], apply: bool):
    if isinstance(stmt, cst.SimpleStatementLine):
        kept = []
        for small in reversed(stmt.body):
            new, live = _small(small, live)
            if new is not None:
                kept.append(new)
        if not kept:
            return None, live
        return stmt.with_changes(body=kept[::-1]), live
    if isinstance(stmt, cst.If):
        body, live_body = block(stmt.body.body, live, apply)
        orelse, live_else = stmt.orelse, live
        if isinstance(stmt.orelse, cst.If):
            orelse, live_else = statement(stmt.orelse, live, apply)
        elif stmt.orelse is not None:
            rest, live_else = block(stmt.orelse.body.body, live, apply)
            orelse = (
                stmt.orelse.with_changes(body=stmt.orelse.body.with_changes(body=rest))
                if rest
                else None
            )
        live_in = live_body | live_else | names_read(stmt.test)
        if not body and orelse is None:
            return None, live  # the whole if goes, its test with it
        body = body or [cst.SimpleStatementLine([cst.Pass()])]
        return stmt.with_changes(body=stmt.body.with_changes(body=body), orelse=orelse), live_in
    if isinstance(stmt, (cst.For, cst.While)):
        head = names_read(stmt.iter) if isinstance(stmt, cst.For) else names_read(stmt.test)
        loop_live = set(live)
        for _ in range(10):  # liveness of a loop: iterate to the fixpoint
            _, live_in = block(stmt.body.body, loop_live | live, False)
            if live_in <= loop_live:
                break
            loop_live |= live_in
        body, live_in = block(stmt.body.body, loop_live | live, apply)
        if not body and isinstance(stmt, cst.For) and stmt.orelse is None:
            if not set(target_names(stmt.target)) & live:
                return None, live  # a for loop left doing nothing goes, as an empty if does
        return stmt.with_changes(
            body=stmt.body.with_changes(body=body or [cst.SimpleStatementLine([cst.Pass()])])
        ), live | live_in | head
    if isinstance(stmt, cst.With):
        body, live_in = block(stmt.body.body, live, apply)
        return stmt.with_changes(body=stmt.body.with_changes(body=body)), live_in | set().union(
            *(names_read(i.item) for i in stmt.items)
        )
    return stmt, live | names_read(stmt)


def eliminate_dead_stores(func: cst.FunctionDef) -> cst.FunctionDef:
    params = [*func.params.posonly_params, *func.params.params, *func.params.kwonly_params]
    body, _ = block(func.body.body, {f"{p.name.value}[]" for p in params}, True)
    return func.with_changes(
        body=func.body.with_changes(body=body or [cst.SimpleStatementLine([cst.Pass()])])
    )
