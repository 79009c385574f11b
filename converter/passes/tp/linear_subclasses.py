"""Local ``nn.Linear`` subclasses that compute a plain linear map.

Falcon's ``FalconLinear`` is ``input @ self.weight.T`` plus the bias, kept unfused for
bfloat16 rounding. The TP pass shards such a layer like ``nn.Linear`` (the parallel
layer fuses the bias add, a last-bit difference in low precision). Only a subclass
without its own ``__init__`` (its parameters are exactly ``weight`` and ``bias``) whose
``forward`` only multiplies by ``self.weight`` (``@``, ``.T``, ``F.linear``, ``matmul``)
and adds ``self.bias`` qualifies; any other subclass (a scaled or adapted linear) stays
a local, replicated layer.
"""

from __future__ import annotations

import libcst as cst

from converter.cst_helpers import dotted, methods_of, nodes_of

LINEAR_BASES = frozenset({"nn.Linear", "torch.nn.Linear", "Linear"})
_CALLS = frozenset(
    {"F.linear", "nn.functional.linear", "torch.nn.functional.linear", "torch.matmul"}
)
_OPS = (cst.MatrixMultiply, cst.Add)


def linear_subclasses(module: cst.Module) -> set[str]:
    """Names of the module's classes that are plain linear maps (see the module doc)."""
    out = set()
    for stmt in module.body:
        if not isinstance(stmt, cst.ClassDef):
            continue
        if not {dotted(b.value) for b in stmt.bases} & LINEAR_BASES:
            continue
        methods = methods_of(stmt)
        if "__init__" in methods or set(methods) - {"forward"}:
            continue
        forward = methods.get("forward")
        if forward is None or _is_linear_map(forward):
            out.add(stmt.name.value)
    return out


def _is_linear_map(forward: cst.FunctionDef) -> bool:
    # the allowed functions' own dotted names (`torch.nn.functional`, ...) are no reads
    prefixes = {f.rsplit(".", i)[0] for f in _CALLS for i in range(f.count(".") + 1)}
    for node in nodes_of(forward.body, cst.BinaryOperation, cst.Call, cst.Attribute):
        if isinstance(node, cst.BinaryOperation) and not isinstance(node.operator, _OPS):
            return False
        if isinstance(node, cst.Call) and dotted(node.func) not in _CALLS:
            return False
        if isinstance(node, cst.Attribute) and node.attr.value != "T":
            if dotted(node) not in ("self.weight", "self.bias", *prefixes):
                return False
    return True
