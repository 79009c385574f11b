"""Stage attention: the attention-interface call becomes paged attention.

``out, weights = attention_interface(self, q, k, v, mask, dropout=..., scaling=s, ...)``
-> ``out = self.attn(q.transpose(1, 2)[0], k..., v..., kv_cache, input_metadata)
.unflatten(-1, (-1, self.attn.head_dim))[None]``: q/k/v are ``[1, H, T, D]`` by the
interface's contract, ``self.attn`` returns ``[T, Hq*D]``, and ``out`` is ``[1, T, Hq, D]``
exactly as the interface returned it, so HF's own reshape/o-proj code stays verbatim.
Later reads of ``weights`` become ``None``; the interface lookup goes; an if/else whose
other branch computes ``out`` another way (an eager-only path) keeps the sink's branch.

``__init__`` gains ``self.attn = PagedAttention(heads, head_dim, s, num_kv_heads=...,
sliding_window=..., logits_soft_cap=...)`` built from the call's OWN keyword expressions
(`KWARGS` maps them; an unknown keyword stops the conversion) and the head sizes the
source itself uses in its q/k ``view``/``reshape`` (falling back to the config fields it
reads), see `attention_args`. ``forward`` gains keyword-only ``kv_cache`` and
``input_metadata``; an attention held in a list per decoder layer gains ``kv_caches``
instead and reads ``kv_caches[self.attn.kv_cache_index]``, its ``PagedAttention`` built
with the source's own cache index (converter/analysis/layer_attentions.py). ``self.is_causal`` is honoured (`causal`): False stops the conversion,
a constructor flag is pinned, anything else gets a build-time guard. Several calls that differ only in their
value become one paged attention over the values side by side (`attention_group`).
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m
from libcst.helpers import parse_template_expression, parse_template_statement

from converter.analysis.roles import is_interface_lookup
from converter.context import ConversionContext
from converter.cst_helpers import (
    add_import_from,
    add_params,
    assigned_names,
    code,
    methods_of,
)
from converter.passes.attention import causal, chunked
from converter.passes.attention import eager as eager_core
from converter.passes.attention import groups as attention_group
from converter.passes.attention.interface import CALL_KWARGS, KWARGS, ctor_args
from converter.passes.attention.mask_source import computed_mask

SINK_ARGS = ("kv_cache", "input_metadata")  # what the paged call takes besides q, k, v
POSITIONAL = ("num_heads", "head_dim", "scale")  # PagedAttention's positional parameters
NO_SPACES = cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace(""))
# transformers' attention-interface signature, up to its keyword-only options
INTERFACE_PARAMS = ("module", "query", "key", "value", "attention_mask")


class _Sink(cst.CSTTransformer):
    """Rewrites one attention forward; fills `self.ctor` with PagedAttention arguments."""

    def __init__(self, ctx: ConversionContext, cls: str, forward: cst.FunctionDef) -> None:
        self.ctx, self.cls, self.forward = ctx, cls, forward
        self.interface: str | None = None
        self.weights: str | None = None
        self.call: cst.Call | None = None
        self.mask: cst.BaseExpression | None = None  # the call's attention_mask
        self.operands: list[cst.BaseExpression] = []
        self.sink: cst.SimpleStatementLine | None = None
        self.group: list[cst.Call] = []  # calls differing only in value (attention_group)
        self.seen = 0

    def leave_SimpleStatementLine(self, original, updated):
        small = updated.body[0] if len(updated.body) == 1 else None
        value = getattr(small, "value", None)
        if isinstance(small, (cst.Assign, cst.AnnAssign)) and value is not None:
            if is_interface_lookup(value):
                target = small.targets[0].target if isinstance(small, cst.Assign) else small.target
                self.interface = code(target)
                return cst.RemoveFromParent()
            if (
                isinstance(value, cst.Call)
                and self.interface
                and code(value.func) == self.interface
            ):
                return self._rewrite(original, small, value)
        return updated

    def leave_If(self, original: cst.If, updated: cst.If):
        """An if/else whose one branch holds the sink and whose other computes the same
        output another way (e.g. GPT-2's eager-only upcast path) is an alternative
        attention implementation: keep the sink's branch only."""
        if self.sink is None or updated.orelse is None:
            return updated
        branches = [updated.body.body]
        branches.append(
            [updated.orelse] if isinstance(updated.orelse, cst.If) else updated.orelse.body.body
        )
        for i, block in enumerate(branches):
            if any(stmt is self.sink for stmt in block):
                other = branches[1 - i]
                if assigned_names(other) & assigned_names([self.sink]):
                    return cst.FlattenSentinel(block)
        return updated

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.BaseExpression:
        if self.weights is not None and updated.value == self.weights:
            return cst.Name("None")
        return updated

    def _rewrite(self, stmt, small, call: cst.Call):
        scope = f"{self.cls}.forward"
        self.seen += 1
        if self.call is not None and not self.group:
            raise self.ctx.error("two attention-interface calls in one forward", stmt, scope=scope)
        bound = _bind_interface(call)
        if bound is None:
            raise self.ctx.error(
                "attention-interface call does not bind (module, query, key, value, "
                "attention_mask) once each",
                stmt,
                scope=scope,
                hint="extend converter/passes/attention/ _bind_interface",
            )
        for arg in call.args:
            key = arg.keyword.value if arg.keyword is not None else None
            if arg.star == "**" or key is None or key in INTERFACE_PARAMS:
                continue
            if key not in KWARGS and key not in CALL_KWARGS:
                raise self.ctx.error(
                    f"attention-interface keyword {key}= has no paged-attention equivalent",
                    stmt,
                    scope=scope,
                    hint="map it in converter/passes/attention/ KWARGS (or extend PagedAttention)",
                )
        self._check_mask(stmt, bound)
        target = small.targets[0].target if isinstance(small, cst.Assign) else small.target
        if isinstance(target, cst.Tuple) and len(target.elements) == 2:
            out, weights = (el.value for el in target.elements)
            if isinstance(weights, cst.Name):
                self.weights = weights.value
        else:
            raise self.ctx.error(
                "attention-interface result is not unpacked as (output, weights)", stmt, scope=scope
            )
        if self.call is not None:  # a later call of the group: its part of the fused output
            return attention_group.part(out, self.seen - 1).with_changes(
                leading_lines=stmt.leading_lines
            )
        self.call = call
        self.mask = bound[4]
        self.operands = bound[1:4]
        ops = [self._operand(e) for e in self.operands]
        if self.group:
            ops[2] = self._operand(attention_group.fused_value(self.group, _bind_interface))
        extra = [
            cst.Arg(a.value, keyword=cst.Name(CALL_KWARGS[a.keyword.value]), equal=NO_SPACES)
            for a in call.args
            if a.keyword is not None and a.keyword.value in CALL_KWARGS
        ]
        paged = cst.Call(
            cst.parse_expression("self.attn"),
            [*(cst.Arg(op) for op in ops), *(cst.Arg(cst.Name(n)) for n in SINK_ARGS), *extra],
        )
        if self.group:
            first, *rest = attention_group.first_statements(out, paged, len(self.group))
            self.sink = first.with_changes(leading_lines=stmt.leading_lines)
            return cst.FlattenSentinel([self.sink, *rest])
        # [T, Hq*D] -> [1, T, Hq, D]: exactly what the interface returned
        new = parse_template_statement(
            "{out} = {paged}.unflatten(-1, (-1, self.attn.head_dim))[None]  # [1, T, Hq, D]\n",
            out=out,
            paged=paged,
        )
        self.sink = new.with_changes(leading_lines=stmt.leading_lines)
        return self.sink

    def _check_mask(self, stmt, bound: list[cst.BaseExpression]) -> None:
        """The paged call drops the mask: stop unless it is the model's incoming one
        (`mask_source`)."""
        found = computed_mask(self.forward, bound[4], bound[1:4])
        if found is None:
            return
        raise self.ctx.error(
            f"attention mask `{code(bound[4])}` is computed inside the layer from the step's "
            "tensors: attention masks computed inside the layer (e.g. Doge's dynamic mask) "
            "are not supported by paged attention",
            found.origin or stmt,
            scope=f"{self.cls}.forward",
            hint="out of scope: the paged kernel masks only causally or by sliding window "
            "and has no input for a per-step mask",
        )

    @staticmethod
    def _operand(expr: cst.BaseExpression) -> cst.BaseExpression:
        """``[1, H, T, D]`` by the interface's contract -> ``[T, H, D]``."""
        simple = (cst.Name, cst.Attribute, cst.Call, cst.Subscript)
        if not isinstance(expr, simple) and not expr.lpar:
            expr = expr.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
        return parse_template_expression("{x}.transpose(1, 2)[0]", x=expr)


def _bind_interface(call: cst.Call) -> list[cst.BaseExpression] | None:
    """The call's (module, query, key, value, attention_mask) expressions, passed by
    position or by keyword (dory: ``attention_mask=...``); None unless each binds once."""
    positional = [a.value for a in call.args if a.keyword is None and not a.star]
    if len(positional) > len(INTERFACE_PARAMS):
        return None
    bound = dict(zip(INTERFACE_PARAMS, positional))
    for arg in call.args:
        key = arg.keyword.value if arg.keyword is not None else None
        if key in INTERFACE_PARAMS:
            if key in bound:
                return None
            bound[key] = arg.value
    if len(bound) != len(INTERFACE_PARAMS):
        return None
    return [bound[p] for p in INTERFACE_PARAMS]


_ATTN_HEAD_DIM = m.Attribute(
    value=m.Attribute(value=m.Name("self"), attr=m.Name("attn")), attr=m.Name("head_dim")
)


class _ValueHeads(cst.CSTTransformer):
    """``self.attn.head_dim`` -> ``self.attn.v_head_dim`` (the sink's unflatten)."""

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute):
        if m.matches(updated, _ATTN_HEAD_DIM):
            return updated.with_changes(attr=cst.Name("v_head_dim"))
        return updated


class _OwnCache(cst.CSTTransformer):
    """``self.attn(q, k, v, kv_cache, ...)`` -> ``self.attn(q, k, v,
    kv_caches[self.attn.kv_cache_index], ...)``: an attention of a list per decoder layer
    reads the cache its own index names (converter/analysis/layer_attentions.py)."""

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        if not m.matches(updated.func, _SELF_ATTN):
            return updated
        own = cst.parse_expression("kv_caches[self.attn.kv_cache_index]")
        args = [
            a.with_changes(value=own) if m.matches(a.value, m.Name("kv_cache")) else a
            for a in updated.args
        ]
        return updated.with_changes(args=args)


_SELF_ATTN = m.Attribute(value=m.Name("self"), attr=m.Name("attn"))


def _append_init(
    ctx, cls: str, init: cst.FunctionDef, args: dict[str, cst.BaseExpression]
) -> cst.FunctionDef:
    """``self.attn = PagedAttention(heads, head_dim, scale, <keyword>=...)`` at the end of
    ``__init__``, then its causality guard."""
    keyword = [k for k in args if k not in POSITIONAL]
    call = cst.Call(
        cst.Name("PagedAttention"),
        [cst.Arg(args[k]) for k in POSITIONAL]
        + [cst.Arg(args[k], keyword=cst.Name(k), equal=NO_SPACES) for k in keyword],
    )
    stmt = cst.SimpleStatementLine(
        [cst.Assign([cst.AssignTarget(cst.parse_expression("self.attn"))], call)]
    )
    stmts = [stmt, *causal.guard(ctx, cls, init)]
    return init.with_changes(body=init.body.with_changes(body=[*init.body.body, *stmts]))


class _Classes:
    def __init__(self, ctx: ConversionContext, chunked_mask: chunked.ChunkedMask | None) -> None:
        self.ctx = ctx
        self.chunked_mask = chunked_mask

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        cls = updated.name.value
        if cls not in self.ctx.attention_classes:
            return updated
        updated = causal.pin(self.ctx, updated)
        methods = methods_of(updated)
        forward, init = methods.get("forward"), methods.get("__init__")
        if forward is None or init is None:
            raise self.ctx.error(f"attention class {cls} lacks forward or __init__", original)
        if self.ctx.eager_attention:
            new_forward, args = eager_core.rewrite(self.ctx, cls, updated, forward)
        else:
            sink = _Sink(self.ctx, cls, forward)
            calls = attention_group.interface_calls(forward)
            if len(calls) > 1 and attention_group.groupable(forward, calls, _bind_interface):
                sink.group = calls
            new_forward = forward.visit(sink)
            if sink.call is None:
                raise self.ctx.error(
                    f"{cls}.forward looks up the attention interface but never calls it",
                    forward,
                    scope=f"{cls}.forward",
                )
            args = ctor_args(self.ctx, cls, sink.call, sink.operands, init, forward, methods)
            if sink.group:  # the values side by side in one cache entry per head
                one = args.get("v_head_dim", args["head_dim"])
                args["v_head_dim"] = cst.BinaryOperation(
                    cst.Integer(str(len(sink.group))),
                    cst.Multiply(),
                    one.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()]),
                )
            if "v_head_dim" in args:  # the output's heads are value-sized
                new_forward = new_forward.visit(_ValueHeads())
            if self.chunked_mask is not None:
                size = chunked.chunk_size(
                    self.ctx, self.chunked_mask, cls, init, sink.mask, forward
                )
                if size is not None:
                    args["attention_chunk_size"] = size
        cache = ("kv_cache", "torch.Tensor")
        if cls in self.ctx.cache_index:  # one of a list per decoder layer: its own cache
            args["kv_cache_index"] = cst.parse_expression(self.ctx.cache_index[cls])
            new_forward = new_forward.visit(_OwnCache())
            cache = ("kv_caches", "list[torch.Tensor]")
        self.ctx.paged_attention[cls] = args
        new_forward = add_params(new_forward, [cache, ("input_metadata", "InputMetadata")])
        new_init = _append_init(self.ctx, cls, init, args)
        body = [
            new_forward if s is forward else new_init if s is init else s for s in updated.body.body
        ]
        return updated.with_changes(body=updated.body.with_changes(body=body))


def run(module: cst.Module, ctx: ConversionContext) -> cst.Module:
    chunked_mask = chunked.find(module, ctx)  # a chunk-local mask: onto the layers it reaches
    rewriter = _Classes(ctx, chunked_mask)
    body = [
        rewriter.leave_ClassDef(s, s) if isinstance(s, cst.ClassDef) else s for s in module.body
    ]
    module = module.with_changes(body=body)
    if chunked_mask is not None:
        module = chunked.drop_builders(module)
    names = {"InputMetadata", "PagedAttention"}
    if any("alibi" in args for args in ctx.paged_attention.values()):
        names.add("Alibi")
    return add_import_from(module, names, "runtime.attention")
