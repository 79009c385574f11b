"""Dict-dispatched classes: ``self.attn = X_ATTENTION_CLASSES[config._attn_implementation](config)``.

Analysis resolves the table to one class (`dispatch_tables`), so the ownership graph sees
the attention class; the select pass turns the construction into a plain ``Cls(...)``
(`resolve_constructions`), after which the table and its other classes fall away.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from converter.cst_helpers import dotted, names_read


def dispatch_tables(module: cst.Module) -> dict[str, str]:
    """Module-level dicts of classes (``X_ATTENTION_CLASSES = {"eager": A, "flash": B}``)
    -> the class a ``TABLE[key](...)`` construction stands for: the one every other value
    derives from (the eager base the variants subclass); failing that, the ``"eager"``
    entry. Tables without a clear base stay unresolved."""
    bases = {
        s.name.value: [dotted(a.value) or "" for a in s.bases]
        for s in module.body
        if isinstance(s, cst.ClassDef)
    }
    local = set(bases)
    out: dict[str, str] = {}
    for stmt in module.body:
        small = stmt.body[0] if isinstance(stmt, cst.SimpleStatementLine) else None
        if not m.matches(small, m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Dict())):
            continue
        entries = {}
        for el in small.value.elements:
            if not isinstance(el, cst.DictElement) or not isinstance(el.value, cst.Name):
                break
            key = el.key.raw_value if isinstance(el.key, cst.SimpleString) else None
            entries[key] = el.value.value
        else:
            classes = set(entries.values())
            if not entries or not classes <= local:
                continue

            def derives(cls: str, root: str, seen: frozenset = frozenset()) -> bool:
                return cls == root or any(
                    b not in seen and derives(b, root, seen | {cls}) for b in bases.get(cls, [])
                )

            roots = [c for c in sorted(classes) if all(derives(o, c) for o in classes)]
            chosen = roots[0] if len(roots) == 1 else entries.get("eager")
            if chosen is not None:
                out[small.targets[0].target.value] = chosen
    return out


class _Resolve(cst.CSTTransformer):
    def __init__(self, tables: dict[str, str]) -> None:
        self.tables = tables
        self.keys: set[str] = set()  # names the replaced subscripts read

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        func = updated.func
        if isinstance(func, cst.Subscript) and dotted(func.value) in self.tables:
            self.keys |= set().union(*(names_read(e) for e in func.slice))
            return updated.with_changes(func=cst.Name(self.tables[dotted(func.value)]))
        return updated

    def leave_FunctionDef(self, original, updated: cst.FunctionDef) -> cst.FunctionDef:
        # the key's local (`attn_implementation = ...`) picked an entry; nothing reads it now
        keys, self.keys = self.keys, set()
        for key in keys:
            dropped = updated.visit(_DropStores({key}))
            if key not in names_read(dropped.body):
                updated = dropped
        return updated


class _DropStores(cst.CSTTransformer):
    """Removes ``name = ...`` statements (at any depth) for `names`."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def leave_SimpleStatementLine(self, original, updated):
        small = updated.body[0] if len(updated.body) == 1 else None
        if m.matches(small, m.Assign(targets=[m.AssignTarget(m.Name())])):
            if small.targets[0].target.value in self.names:
                return cst.RemoveFromParent()
        return updated


def resolve_constructions(node: cst.CSTNode, tables: dict[str, str]) -> cst.CSTNode:
    """``TABLE[key](args)`` -> ``Cls(args)`` for every resolved table."""
    return node.visit(_Resolve(tables)) if tables else node
