"""PagedAttention constructor arguments, from the source's own expressions.

``scale``/``sliding_window``/``logits_soft_cap`` are the attention-interface call's keyword
expressions (`KWARGS` maps them). Head sizes are what the source's q/k ``view``/``reshape``
uses (``self.head_dim``, ``self.head_size``, ``self.num_heads``), falling back to the config
fields the class reads when the view infers heads (``-1``). Every expression must be valid
in ``__init__`` (no forward-local values), else the conversion stops.
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
VIEW_METHODS = ("view", "reshape")


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


def head_shape(name: str, assigns) -> list[cst.BaseExpression] | None:
    """The dims of the first >=3-d view/reshape in `name`'s dataflow (breadth first).

    A fused per-head view (``view(..., H, 3 * D)`` later ``chunk(3)``/``split``) names
    ``N * D`` as its last dim: when the path from `name` to the view splits the last
    axis, the literal factor is dropped so the last dim is one operand's head size."""
    queue, seen = [(name, False)], {name}
    while queue:
        current, split = queue.pop(0)
        for rhs in assigns.get(current, []):
            split = split or _splits(rhs)
            calls = [
                c
                for c in nodes_of(rhs, cst.Call)
                if isinstance(c.func, cst.Attribute) and c.func.attr.value in VIEW_METHODS
            ]
            for call in calls:
                dims = [a.value for a in call.args]
                if len(dims) == 1 and isinstance(dims[0], cst.Name):
                    resolved = assigns.get(dims[0].value, [])
                    dims = [resolved[0]] if resolved else dims
                if len(dims) == 1 and isinstance(dims[0], cst.Tuple):
                    dims = [el.value for el in dims[0].elements]
                if len(dims) >= 3:
                    return [*dims[:-1], _unfused(dims[-1])] if split else dims
        for rhs in assigns.get(current, []):
            for ref in sorted(names_read(rhs) - seen):
                seen.add(ref)
                queue.append((ref, split or _splits(rhs)))
    return None


def _splits(rhs: cst.BaseExpression) -> bool:
    """Whether `rhs` splits a tensor into parts (``.chunk(...)``, ``.split(...)``)."""
    return any(
        isinstance(c.func, cst.Attribute) and c.func.attr.value in ("chunk", "split")
        for c in nodes_of(rhs, cst.Call)
    )


def _unfused(dim: cst.BaseExpression) -> cst.BaseExpression:
    """``3 * D`` / ``D * 3`` -> ``D``; anything else unchanged."""
    if isinstance(dim, cst.BinaryOperation) and isinstance(dim.operator, cst.Multiply):
        if isinstance(dim.left, cst.Integer) and int(dim.left.value) > 1:
            return dim.right
        if isinstance(dim.right, cst.Integer) and int(dim.right.value) > 1:
            return dim.left
    return dim


def ctor_args(
    ctx: ConversionContext,
    cls: str,
    call: cst.Call,
    operands,
    init: cst.FunctionDef,
    forward: cst.FunctionDef,
    methods: dict[str, cst.FunctionDef] | None = None,
) -> dict[str, str]:
    """PagedAttention arguments (name -> code) for `call`, the interface call of `cls`.

    Head counts and sizes come from the operands' symbolic shapes (`head_shapes`, which
    follows helper methods, splits and concatenations), else from the first view in
    their dataflow (`head_shape`); ``v_head_dim`` where the value's head size differs."""
    scope = f"{cls}.forward"
    kwargs = {a.keyword.value: a.value for a in call.args if a.keyword is not None}
    if "scaling" not in kwargs:
        raise ctx.error(
            "attention-interface call without scaling=",
            forward,
            scope=scope,
            hint="the scale must come from the source; extend converter/passes/attention/",
        )
    body = forward.body.body
    assigns = _assignments(_statements(body))
    q_dims = head_shape(code(operands[0]), assigns)
    k_dims = head_shape(code(operands[1]), assigns)
    local = _forward_locals(ctx, init)
    q_new, k_new, v_new = (
        _head_dims(dims, local)
        for dims in operand_shapes(forward, call, operands, {**(methods or {}), "__init__": init})
    )
    if q_new[1] is not None:  # [B, H, T, D]: the interpreter's view of the operands
        q_dims = [cst.parse_expression(q_new[0] or "-1"), cst.parse_expression(q_new[1])]
    if k_new[0] is not None or (k_dims is None and k_new[1] is not None):
        # [H, D] as the view search gives it; only the key's head count H is read
        k_dims = [cst.parse_expression(k_new[0] or "-1"), cst.parse_expression("0")]
    import os

    if os.environ.get("HSLOG"):
        with open(os.environ["HSLOG"], "a") as f:
            f.write(
                f"{ctx.model_type}\t{cls}\tq_new={q_new}\tk_new={k_new}\tv_new={v_new}\tfinal_q={[code(d) for d in q_dims] if q_dims else None}\tfinal_k={[code(d) for d in k_dims] if k_dims else None}\n"
            )
    if q_dims is None or k_dims is None:
        raise ctx.error(
            "cannot find the q/k view that splits heads",
            forward,
            scope=scope,
            hint="extend converter/passes/attention/ head_shape",
        )
    config = (
        "config" if any(p.name.value == "config" for p in init.params.params) else "self.config"
    )
    config_reads = ctx.classes[cls].config_reads
    heads = _heads(q_dims[-2], "num_attention_heads", config, config_reads)
    kv = _heads(k_dims[-2], "num_key_value_heads", config, config_reads)
    if heads is None:
        raise ctx.error(
            "cannot tell the number of attention heads",
            forward,
            scope=scope,
            hint="the q view must name it, or the class read config.num_attention_heads",
        )
    args = {"num_heads": heads, "head_dim": code(q_dims[-1]), "scale": code(kwargs["scaling"])}
    if kv is not None and kv != heads:
        args["num_kv_heads"] = kv
    if v_new[1] is not None and norm(v_new[1]) != norm(args["head_dim"]):
        args["v_head_dim"] = v_new[1]
    for key, target in KWARGS.items():
        if target and key != "scaling" and key in kwargs:
            args[target] = code(kwargs[key])
    args.update(rule_overrides(ctx))
    for name, text in args.items():
        if local(text):
            raise ctx.error(
                f"PagedAttention {name}={text} uses forward-local values {local(text)}",
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

    def local(code: str) -> list[str]:
        expr = cst.parse_expression(code)
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


def rule_overrides(ctx: ConversionContext) -> dict[str, str]:
    """``[<type>.paged_attention]`` in rules/architectures.toml: PagedAttention argument
    expressions the source's views cannot tell (e.g. GPT-BigCode's K/V head count, which
    only its multi-query branch's ``unsqueeze(1)`` shows). Checked like derived ones."""
    arch = ctx.rules.get("architectures", {}).get(ctx.model_type, {})
    return dict(arch.get("paged_attention", {}))


def _heads(dim, field, config, config_reads) -> str | None:
    """The view's head-count dim, unless it is inferred (``-1``): then the config field
    (the query head count even when the class takes it as a constructor argument, as
    biogpt's and ctrl's do: every config answers ``num_attention_heads`` through its
    attribute_map)."""
    if not isinstance(dim, (cst.UnaryOperation, cst.Integer)):
        return code(dim)
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
