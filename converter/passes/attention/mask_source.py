"""Where the attention-interface call's mask comes from.

The paged call has no mask input: the kernel masks causally (and by ``sliding_window``)
on its own, which is what the model's incoming causal/sliding mask says, so the sink
drops the mask and the prune stage removes what built it. That is only right when the
mask is the incoming one (a parameter, maybe sliced to the keys' length or picked per
layer). A mask computed inside the layer from the step's tensors (Doge's dynamic mask,
built from the value states) says something else: dropping it would give a module that
computes another function, so the conversion stops.

Step tensors are the forward's first parameter (the hidden states) and the names the
q/k/v operands read; a name is computed from them when an assignment of it reads one of
them by value. Reads of metadata (``.shape``, ``.dtype``, ``.device``, ``.size()``,
``.to(x)``, ``*_like(x)``) are not value reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from converter.cst_helpers import call_name, names_read, nodes_of, target_names

META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
META_METHODS = {"size", "dim", "numel"}  # x.size(...): no value of x
# x.<m>(y) / torch.<m>(y): only y's dtype, device or shape
META_ARGS = {"to", "type_as", "expand_as", "view_as", "reshape_as"}
META_FUNCS = {"zeros_like", "ones_like", "empty_like", "full_like", "finfo", "iinfo"}


class _DropMeta(cst.CSTTransformer):
    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute):
        return cst.Name("None") if updated.attr.value in META_ATTRS else updated

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        name = call_name(updated)
        if isinstance(updated.func, cst.Attribute) and name in META_METHODS:
            return cst.Name("None")
        if name in META_FUNCS:
            return cst.Name("None")
        if isinstance(updated.func, cst.Attribute) and name in META_ARGS:
            return updated.with_changes(args=[])
        return updated


def value_reads(expr: cst.CSTNode) -> set[str]:
    """Names `expr` reads the values of (metadata reads left out)."""
    return names_read(expr.visit(_DropMeta()))


def _bindings(forward: cst.FunctionDef) -> list[tuple[cst.CSTNode, list[str], cst.CSTNode]]:
    """(statement, names bound, value) of every assignment in `forward`, in source order."""
    out = []
    for line in nodes_of(forward.body, cst.SimpleStatementLine):
        for small in line.body:
            if isinstance(small, cst.Assign):
                names = [n for t in small.targets for n in target_names(t.target)]
            elif isinstance(small, (cst.AnnAssign, cst.AugAssign)) and small.value is not None:
                names = target_names(small.target)
            else:
                continue
            out.append((line, names, small.value))
    return out


@dataclass(frozen=True)
class ComputedMask:
    origin: cst.CSTNode | None  # first statement binding the mask's name from step tensors


def computed_mask(
    forward: cst.FunctionDef, mask: cst.BaseExpression, operands: list[cst.BaseExpression]
) -> ComputedMask | None:
    """None when `mask` (the interface call's mask argument) does not depend on the step's
    tensors by value; else where it is computed (origin None: in the call's argument)."""
    params = [p.name.value for p in forward.params.params if p.name.value != "self"]
    tainted = set(params[:1]) | set().union(*(value_reads(op) for op in operands))
    tainted -= {"self", "None"}  # the module's own attributes are not the step's
    bindings = _bindings(forward)
    changed = True
    while changed:
        changed = False
        for _, names, value in bindings:
            if set(names) - tainted and value_reads(value) & tainted:
                tainted |= set(names)
                changed = True
    if not value_reads(mask) & tainted:
        return None
    origin = None
    if isinstance(mask, cst.Name):
        origin = next(
            (
                line
                for line, names, value in bindings
                if mask.value in names and value_reads(value) & tainted
            ),
            None,
        )
    return ComputedMask(origin)
