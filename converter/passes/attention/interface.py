"""PagedAttention constructor arguments, from the source's own expressions.

``scale``/``sliding_window``/``logits_soft_cap`` are the attention-interface call's keyword
expressions (`KWARGS` maps them). Head counts and sizes are the q/k/v dims the head-shape
interpreter reads off the code building them (``self.head_dim``, ``self.head_size``,
``self.num_heads``; `converter.analysis.head_shapes`), a count the source infers (``-1``)
being the config field. Every expression must be valid in ``__init__`` (no forward-local
values), else the conversion stops.
"""

from __future__ import annotations

import libcst as cst

from converter.analysis.head_shapes import operand_shapes
from converter.analysis.shape_ops import norm
from converter.context import ConversionContext
from converter.cst_helpers import BUILTINS, code, names_read, nodes_of, self_attr

# attention-interface keyword -> PagedAttention keyword (None: inference no-op, dropped)
KWARGS: dict[str, str | None] = {
    "scaling": "scale",
    "sliding_window": "sliding_window",
    "softcap": "logits_soft_cap",
    "dropout": None,
    "position_ids": None,  # flash-attention varlen hint; paged metadata replaces it
}
# attention-interface keyword -> PagedAttention.forward keyword: per-call tensors (the
# source's own expression, e.g. a parameter, is passed on at every call)
CALL_KWARGS: dict[str, str] = {
    "s_aux": "sinks",  # attention sinks: one logit per head in the softmax denominator
}


def _statements(body) -> list[cst.BaseStatement]:
    """All statements of a block, nested blocks flattened, in source order."""
    out: list[cst.BaseStatement] = []
    for stmt in body:
        out.append(stmt)
        for block in ("body", "orelse"):
            inner = getattr(stmt, block, None)
            if isinstance(inner, cst.BaseSuite):
                out += _statements(inner.body)
            elif isinstance(inner, (cst.If, cst.Else)):
                out += _statements([inner] if isinstance(inner, cst.If) else inner.body.body)
    return out


def _assignments(stmts) -> dict[str, list[cst.BaseExpression]]:
    found: dict[str, list[cst.BaseExpression]] = {}
    for stmt in stmts:
        if not isinstance(stmt, cst.SimpleStatementLine):
            continue
        for small in stmt.body:
            if isinstance(small, cst.Assign):
                targets = [t.target for t in small.targets]
            elif isinstance(small, cst.AnnAssign) and small.value is not None:
                targets = [small.target]
            else:
                continue
            for target in targets:
                elts = target.elements if isinstance(target, cst.Tuple) else [target]
                for el in elts:
                    node = el.value if isinstance(el, cst.Element) else el
                    if isinstance(node, cst.Name):
                        found.setdefault(node.value, []).append(small.value)
    return found


def ctor_args(
    ctx: ConversionContext,
    cls: str,
    call: cst.Call,
    operands,
    init: cst.FunctionDef,
    forward: cst.FunctionDef,
    methods: dict[str, cst.FunctionDef] | None = None,
) -> dict[str, cst.BaseExpression]:
    """PagedAttention arguments (name -> expression) for `call`, the interface call of
    `cls`: the call's own keyword expressions, and dims the interpreter read.

    Head counts and sizes are the operands' ``[B, H, T, D]`` dims as the head-shape
    interpreter reads them (`converter.analysis.head_shapes`: it follows helper methods,
    views, splits and concatenations); a head count the source infers (``-1``) is the
    config's; ``v_head_dim`` where the value's head size differs."""
    scope = f"{cls}.forward"
    kwargs = {a.keyword.value: a.value for a in call.args if a.keyword is not None}
    if "scaling" not in kwargs:
        raise ctx.error(
            "attention-interface call without scaling=",
            forward,
            scope=scope,
            hint="the scale must come from the source; extend converter/passes/attention/",
        )
    local = _forward_locals(ctx, init)
    methods = {**(methods or {}), "__init__": init}
    q, k, v = (_head_dims(dims, local) for dims in operand_shapes(forward, call, operands, methods))
    overrides = rule_overrides(ctx)
    if q[1] is None:
        raise ctx.error(
            "cannot tell the query's head size from the code building it",
            forward,
            scope=scope,
            hint="extend the head-shape interpreter (converter/analysis/head_shapes.py)",
        )
    if k == (None, None) and "num_kv_heads" not in overrides:
        raise ctx.error(
            "cannot tell the key's head count from the code building it",
            forward,
            scope=scope,
            hint="extend the head-shape interpreter (converter/analysis/head_shapes.py)",
        )
    config = (
        "config" if any(p.name.value == "config" for p in init.params.params) else "self.config"
    )
    config_reads = ctx.classes[cls].config_reads
    heads = _heads(q[0], "num_attention_heads", config, config_reads)
    kv = _heads(k[0], "num_key_value_heads", config, config_reads)
    dims = {"num_heads": heads, "head_dim": q[1]}
    if kv is not None and kv != heads:
        dims["num_kv_heads"] = kv
    if v[1] is not None and norm(v[1]) != norm(q[1]):
        dims["v_head_dim"] = v[1]
    args = {name: cst.parse_expression(dim) for name, dim in dims.items()}  # dims are code
    args = (
        {"num_heads": args.pop("num_heads"), "head_dim": args.pop("head_dim")}
        | {"scale": kwargs["scaling"]}
        | args
    )
    for key, target in KWARGS.items():
        if target and key != "scaling" and key in kwargs:
            args[target] = kwargs[key]
    args.update(overrides)
    for name, value in args.items():
        if local(value):
            raise ctx.error(
                f"PagedAttention {name}={code(value)} uses forward-local values {local(value)}",
                forward,
                scope=scope,
                hint="compute it in __init__ in the source or extend the pass",
            )
    return args


def _forward_locals(ctx: ConversionContext, init: cst.FunctionDef):
    """A function: code -> the names in it that ``__init__`` cannot evaluate (the
    PagedAttention ctor goes at its end: a local it binds once, at top level, is there;
    gemma4's ``layer_config = config.per_layer_config[layer_idx]``)."""
    allowed = {p.name.value for p in init.params.params} | ctx.module_symbols | BUILTINS
    allowed |= _bound_once(init)
    init_attrs = _self_stores(init)

    def local(expr: str | cst.BaseExpression) -> list[str]:
        expr = cst.parse_expression(expr) if isinstance(expr, str) else expr
        free = names_read(expr) - allowed - {"self"}
        missing = {a for a in _self_loads(expr) if a not in init_attrs and a != "config"}
        return sorted(free | missing)

    return local


def _bound_once(init: cst.FunctionDef) -> set[str]:
    """Names a top-level statement of `init` binds, and nothing else in it rebinds."""
    top = _assignments([s for s in init.body.body if isinstance(s, cst.SimpleStatementLine)])
    every = _assignments(_statements(init.body.body))
    return {name for name in top if len(every.get(name, [])) == 1}


def _head_dims(dims, local) -> tuple[str | None, str | None]:
    """(head count, head size) of a ``[B, H, T, D]`` operand, each None where unknown,
    inferred (``-1``) or not computable in ``__init__``."""
    if dims is None or len(dims) != 4:
        return None, None
    heads, size = dims[1], dims[3]
    heads = heads if heads not in (None, "-1") and not local(heads) else None
    size = size if size not in (None, "-1") and not local(size) else None
    return heads, size


def rule_overrides(ctx: ConversionContext) -> dict[str, cst.BaseExpression]:
    """``[<type>.paged_attention]`` in rules/architectures.toml: PagedAttention argument
    expressions the source's views cannot tell (e.g. GPT-BigCode's K/V head count, which
    only its multi-query branch's ``unsqueeze(1)`` shows). Checked like derived ones."""
    arch = ctx.rules.get("architectures", {}).get(ctx.model_type, {})
    return {k: cst.parse_expression(v) for k, v in arch.get("paged_attention", {}).items()}


def _heads(dim: str | None, field, config, config_reads) -> str:
    """The head-count dim, unless the source infers it (``-1``, a literal, unknown): then
    the config field (the query head count even when the class takes it as a constructor
    argument, as biogpt's and ctrl's do: every config answers ``num_attention_heads``
    through its attribute_map; the key's only where the class reads it, else the
    query's)."""
    if dim is not None and not isinstance(
        cst.parse_expression(dim), (cst.UnaryOperation, cst.Integer)
    ):
        return dim
    if field in config_reads or field == "num_attention_heads":
        return f"{config}.{field}"
    return None


def _self_stores(func: cst.FunctionDef) -> set[str]:
    """Names and ``self.<attr>`` attributes a function assigns."""
    found = set(_assignments(_statements(func.body.body)))
    for target in nodes_of(func, cst.AssignTarget):
        # ``self.a, self.b = ...`` stores both
        for node in nodes_of(target.target, cst.Attribute):
            attr = self_attr(node)
            if attr is not None:
                found.add(attr)
    return found


def _self_loads(expr: cst.CSTNode) -> set[str]:
    return {a for a in (self_attr(n) for n in nodes_of(expr, cst.Attribute)) if a is not None}
