"""The dataflow rule for tensor parallelism, for files without a plan (OPT, GPT-2, ...).

Inside one class's ``forward``: a linear whose output reaches paged attention's q/k/v,
or reaches another linear through elementwise code only (activations, products,
views), is column-parallel; the linear consuming attention's output, or that other
linear, is row-parallel. This is Megatron's pairing: the sharded intermediate never
needs a collective until the row-parallel linear all-reduces.

Tracing is a forward taint over the method's statements: each local name carries the
set of linears (or the attention call) its value derives from. In the attention class
every module call passes taint through (per-head q/k norms are TP-local); elsewhere a
call of another module (a norm over the full hidden size, a sub-layer) cuts it.
Only classes under the decoder layer are traced: linears of the base model
(OPT's project_in/out) stay replicated.
"""

from __future__ import annotations

import libcst as cst

from converter.analysis.ownership import owns
from converter.context import ConversionContext
from converter.cst_helpers import dotted, methods_of, self_attr
from converter.passes.tp.linear_subclasses import linear_subclasses

ATTN = "<paged attention>"
LINEAR_CTORS = frozenset({"nn.Linear", "torch.nn.Linear", "Linear"})
ELEMENTWISE_SUFFIXES = ("GELU", "SiLU", "ReLU", "Tanh", "Sigmoid", "Identity", "Activation", "Mish")


class _Tracer:
    def __init__(
        self, linears: set[str], attn_attrs: set[str], passthrough: set[str] | None
    ) -> None:
        self.linears = linears
        self.attn_attrs = attn_attrs
        self.passthrough = passthrough  # None: every module call passes taint
        self.env: dict[str, set[str]] = {}
        self.edges: set[tuple[str, str]] = set()

    def expr(self, node: cst.CSTNode) -> set[str]:
        if isinstance(node, cst.Name):
            return set(self.env.get(node.value, ()))
        if isinstance(node, cst.Call):
            args = set()
            for arg in node.args:
                args |= self.expr(arg.value)
            attr = self_attr(node.func)
            if attr in self.linears:
                self.edges |= {(t, attr) for t in args}
                return {attr}
            if attr in self.attn_attrs:
                for arg in node.args[:3]:
                    self.edges |= {(t, ATTN) for t in self.expr(arg.value)}
                return {ATTN}
            if attr is not None and self.passthrough is not None and attr not in self.passthrough:
                return set()  # another module: its output is not elementwise in ours
            return args | self.expr(node.func)
        if isinstance(node, cst.Attribute):
            return self.expr(node.value)
        out: set[str] = set()
        for child in node.children:
            if isinstance(
                child,
                cst.BaseExpression
                | cst.Arg
                | cst.Element
                | cst.SubscriptElement
                | cst.Index
                | cst.Slice
                | cst.StarredElement
                | cst.DictElement,
            ):
                out |= self.expr(child)
        return out

    def bind(self, target: cst.BaseExpression, taint: set[str]) -> None:
        if isinstance(target, cst.Name):
            self.env[target.value] = set(taint)
        elif isinstance(target, cst.Tuple | cst.List):
            for el in target.elements:
                self.bind(el.value, taint)

    def statements(self, body: list[cst.CSTNode]) -> None:
        for stmt in body:
            if isinstance(stmt, cst.SimpleStatementLine):
                for small in stmt.body:
                    self.small(small)
            elif isinstance(stmt, cst.If | cst.For | cst.While | cst.With | cst.Try):
                if isinstance(stmt, cst.If | cst.While):
                    self.expr(stmt.test)
                if isinstance(stmt, cst.For):
                    self.bind(stmt.target, self.expr(stmt.iter))
                self.statements(list(stmt.body.body))
                orelse = getattr(stmt, "orelse", None)
                while orelse is not None:
                    self.statements(list(orelse.body.body))
                    orelse = getattr(orelse, "orelse", None) if isinstance(orelse, cst.If) else None

    def small(self, small: cst.BaseSmallStatement) -> None:
        if isinstance(small, cst.Assign):
            taint = self.expr(small.value)
            for t in small.targets:
                self.bind(t.target, taint)
        elif isinstance(small, cst.AugAssign | cst.AnnAssign) and small.value is not None:
            taint = self.expr(small.value)
            if isinstance(small.target, cst.Name) and isinstance(small, cst.AugAssign):
                taint |= self.env.get(small.target.value, set())
            self.bind(small.target, taint)
        elif isinstance(small, cst.Expr | cst.Return) and small.value is not None:
            self.expr(small.value)


def _elementwise_attrs(info_children: dict, init: cst.FunctionDef | None) -> set[str]:
    """Attributes holding activations: `ACT2FN[...]` assignments and nn.GELU-style modules."""
    out = {a for a, c in info_children.items() if c.ctor.endswith(ELEMENTWISE_SUFFIXES)}
    if init is not None:
        for stmt in init.body.body:
            for small in stmt.body if isinstance(stmt, cst.SimpleStatementLine) else []:
                if isinstance(small, cst.Assign) and isinstance(small.value, cst.Subscript):
                    attr = self_attr(small.targets[0].target)
                    if attr and dotted(small.value.value) in ("ACT2FN", "ACT2CLS"):
                        out.add(attr)
    return out


def dataflow_styles(
    module: cst.Module,
    ctx: ConversionContext,
    feeds: dict[tuple[str, str], set[str]] | None = None,
) -> dict[tuple[str, str], str]:
    """(class, attr) -> "colwise" / "rowwise" for the linears the rule can pair; `feeds`,
    when given, gets the linears of the same class each linear's output reaches."""
    styles: dict[tuple[str, str], str] = {}
    if not ctx.decoder_layer_class:
        return styles
    subclasses = linear_subclasses(module)  # Falcon's FalconLinear
    for stmt in module.body:
        if not isinstance(stmt, cst.ClassDef):
            continue
        cls = stmt.name.value
        info = ctx.classes.get(cls)
        if info is None or not owns(ctx, ctx.decoder_layer_class, {cls}):
            continue
        methods = methods_of(stmt)
        if "forward" not in methods:
            continue
        linears = {a for a, c in info.children.items() if c.ctor in LINEAR_CTORS | subclasses}
        init = methods.get("__init__")
        attn_attrs = set()
        if init is not None:
            for line in init.body.body:
                for small in line.body if isinstance(line, cst.SimpleStatementLine) else []:
                    if isinstance(small, cst.Assign) and isinstance(small.value, cst.Call):
                        if (dotted(small.value.func) or "").endswith("PagedAttention"):
                            attn_attrs.add(self_attr(small.targets[0].target) or "")
        if not linears:
            continue
        passthrough = None if attn_attrs else _elementwise_attrs(info.children, init)
        tracer = _Tracer(linears, attn_attrs, passthrough)
        tracer.statements(list(methods["forward"].body.body))
        for a, b in tracer.edges:
            if feeds is not None and a in linears and b in linears:
                feeds.setdefault((cls, a), set()).add(b)
        producers = {a for a, b in tracer.edges if a in linears and (b in linears or b == ATTN)}
        consumers = {b for a, b in tracer.edges if b in linears and (a in linears or a == ATTN)}
        for attr in producers ^ consumers:  # a linear on both sides of a pair has no style
            styles[(cls, attr)] = "colwise" if attr in producers else "rowwise"
    return styles
