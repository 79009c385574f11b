"""Stage tp: tensor parallelism, driven by the plan `converter.passes.tp.plan` resolves.

- ``nn.Linear`` -> ``ColumnParallelLinear`` / ``RowParallelLinear`` (same arguments);
  the LM head -> ``ParallelLMHead(vocab, hidden, bias=...)``; the token embedding (or
  the base of its local ``nn.Embedding`` subclass) -> ``VocabParallelEmbedding``.
- Separate q/k/v (gate/up) projections of one input fuse into ``QKVParallelLinear``
  (``MergedColumnParallelLinear``); their calls become a split of the fused output, and
  ``ctx.stacked_params`` records ``(fused, checkpoint name, shard id)`` for load_weights.
  Checkpoints that already hold the fusion (Phi-3 ``qkv_proj``) load with shard id None.
- Head counts: the ``PagedAttention`` ctor gets ``local_num_heads(...)`` /
  ``local_num_kv_heads(...)``, and every other method of the attention class reads the
  head-count expressions through them (``__init__`` keeps totals: the parallel layers
  take full sizes). Views with ``-1`` need nothing.
With TP size 1 every parallel layer is a plain local layer: no process group needed.
"""

from __future__ import annotations

import libcst as cst

from converter.context import ConversionContext
from converter.cst_helpers import (
    add_import_from,
    code,
    dotted,
    drop_unused_locals,
    methods_of,
)
from converter.passes.tp.args import LinearArgs, expr, kwarg, linear_args
from converter.passes.tp.cases import runtime_names, sharded_test
from converter.passes.tp.fuse import Fusion, LocalQKVSplit, plan_fusions, split_statement
from converter.passes.tp.heads import (
    HeadCounts,
    WrapPagedAttention,
    head_expressions,
    pa_args,
    paged_attention_call,
)
from converter.passes.tp.init_rewriter import InitRewriter
from converter.passes.tp.plan import Decision, resolve_plan
from converter.passes.tp.switch import (
    GuardedQKVSplit,
    config_of,
    flag_name,
    insert_flag,
    sharded_conditions,
    switch,
)

PARALLEL_CTORS = {
    "colwise": "ColumnParallelLinear",
    "colwise_gather_output": "ColumnParallelLinear",
    "rowwise": "RowParallelLinear",
    "rowwise_split_input": "RowParallelLinear",
}


class _TPPass:
    def __init__(self, module: cst.Module, ctx: ConversionContext) -> None:
        self.ctx = ctx
        self.decisions: dict[tuple[str, str], Decision] = resolve_plan(module, ctx)
        self.fusions: dict[str, list[Fusion]] = plan_fusions(module, ctx, self.decisions)
        self.used: set[str] = set()
        self.vocab_bases: set[str] = set()  # local nn.Embedding subclasses to re-base
        self.pa: dict[str, dict[str, str]] = {}
        self.orphans: set[str] = set()  # ctor arguments the rewrite may leave unused
        self.qkv_single: dict[str, str] = {}  # class -> its fused [Q|K|V] linear's attr
        # class -> the cases deciding whether its heads shard, for styles the config picks
        self.sharded_if = sharded_conditions(self.decisions, ctx)
        self.flag: dict[str, str] = {}  # class -> the attribute holding that flag

    def ctor(self, name: str, args: list[cst.BaseExpression | cst.Arg | str]) -> cst.Call:
        """``name(*args)``: nodes as they are, text (tables of strings) through `expr`."""
        self.used.add(name)
        args = [
            a if isinstance(a, cst.Arg) else cst.Arg(expr(a) if isinstance(a, str) else a)
            for a in args
        ]
        return cst.Call(cst.Name(name), args)

    def ctor_for(
        self, cls: str, attr: str, call: cst.Call, config: cst.BaseExpression
    ) -> cst.BaseExpression:
        """The layer for `call` (building `cls`'s `attr`); `config` is what its __init__
        reads the config as (tests of config-chosen styles)."""
        decision = self.decisions.get((cls, attr))
        if decision is None or decision.style == "replicated":
            return call
        where = f"{cls}.{attr}"
        if decision.style == "conditional":
            self.used |= runtime_names(decision.cases)
            return switch(
                decision.cases, config, lambda style: self.column_ctor(cls, style, call, where)
            )
        if decision.style == "vocab":
            ctor = dotted(call.func) or ""
            if ctor.split(".")[-1] != "Embedding":
                self.vocab_bases.add(ctor)  # a local nn.Embedding subclass: re-base it
                self.used.add("VocabParallelEmbedding")
                return call
            self.used.add("VocabParallelEmbedding")
            return call.with_changes(func=cst.Name("VocabParallelEmbedding"))
        a = linear_args(call, self.ctx, where)
        if decision.style == "lm_head":
            return self.ctor("ParallelLMHead", [a.out, a.in_, kwarg("bias", a.bias)])
        fused_single = self.fused_checkpoint(cls, attr, a, call)
        if fused_single is not None:
            self.orphans.add(code(a.out))  # e.g. Phi-3's `op_size`, now unused
            return fused_single
        if decision.style in ("colwise_qkv", "colwise_gather_output"):
            return self.column_ctor(cls, decision.style, call, where)
        extra = []
        if decision.style.startswith("rowwise") and cls in self.sharded_if:
            # its input is this rank's heads when the config's case shards them
            extra.append(kwarg("input_is_parallel", expr(f"self.{self.flag[cls]}")))
        elif decision.style == "rowwise_split_input" and not self.class_has_sharded_producer(cls):
            extra.append(kwarg("input_is_parallel", cst.Name("False")))
        return self.ctor(
            PARALLEL_CTORS[decision.style], [a.in_, a.out, kwarg("bias", a.bias), *extra, *a.extra]
        )

    def column_ctor(self, cls: str, style: str, call: cst.Call, where: str) -> cst.Call:
        """The column-parallel layer of one style for the linear `call` builds."""
        a = linear_args(call, self.ctx, where)
        if style == "colwise_qkv":
            if cls not in self.pa:
                raise self.ctx.error(
                    f"{where}: colwise_qkv needs the class's PagedAttention head counts",
                    call,
                    hint="use it on the fused q/k/v projection of an attention class",
                )
            return self.ctor(
                "QKVParallelLinear", [*self.qkv_args(self.pa[cls], a.in_, a.bias), *a.extra]
            )
        gather = (
            [kwarg("gather_output", cst.Name("True"))] if style == "colwise_gather_output" else []
        )
        return self.ctor(
            "ColumnParallelLinear", [a.in_, a.out, kwarg("bias", a.bias), *gather, *a.extra]
        )

    def maybe_qkv(self, cls: str) -> list[str]:
        """Linears of `cls` the config may build as a QKVParallelLinear (a colwise_qkv case)."""
        return [
            a
            for (c, a), d in self.decisions.items()
            if c == cls and any(case.style == "colwise_qkv" for case in d.cases)
        ]

    def class_has_sharded_producer(self, cls: str) -> bool:
        """Does a linear of `cls` leave its output sharded (so a row-parallel consumer
        receives this rank's slice, not the full input)?"""
        if self.fusions.get(cls):
            return True
        return any(
            c == cls
            and (
                d.style in ("colwise", "colwise_qkv", "conditional")
                or (d.style == "colwise_gather_output" and self.is_fused_checkpoint(attr))
            )
            for (c, attr), d in self.decisions.items()
        )

    def is_fused_checkpoint(self, attr: str) -> str | None:
        """The kind ("qkv" / "gate_up") of a single linear whose checkpoint tensor is
        fused; an architecture's own list of a kind replaces rules/tp.toml's (CodeGen's
        qkv_proj is interleaved per model-parallel group, not [Q|K|V]: `qkv = []`)."""
        table = dict(self.ctx.rules.get("tp", {}).get("fused_checkpoint", {}))
        arch = self.ctx.rules.get("architectures", {}).get(self.ctx.model_type, {})
        table.update(arch.get("fused_checkpoint", {}))
        return next((kind for kind, names in table.items() if attr in names), None)

    def fused_checkpoint(
        self, cls: str, attr: str, a: LinearArgs, call: cst.Call
    ) -> cst.Call | None:
        """A single linear whose checkpoint tensor is already [Q|K|V] or [gate|up]."""
        kind = self.is_fused_checkpoint(attr)
        if kind == "qkv" and cls in self.pa:
            pa = self.pa[cls]
            self.qkv_single[cls] = attr
            return self.ctor("QKVParallelLinear", [*self.qkv_args(pa, a.in_, a.bias), *a.extra])
        if kind == "gate_up":
            out = a.out
            half = cst.BinaryOperation(
                out.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()]),
                cst.FloorDivide(),
                cst.Integer("2"),
            )  # (out) // 2, unless out is 2 * X (or X * 2)
            if isinstance(out, cst.BinaryOperation) and isinstance(out.operator, cst.Multiply):
                if code(out.left) == "2":
                    half = out.right
                elif code(out.right) == "2":
                    half = out.left
            halves = cst.List([cst.Element(half), cst.Element(half)])
            return self.ctor(
                "MergedColumnParallelLinear", [a.in_, halves, kwarg("bias", a.bias), *a.extra]
            )
        return None

    @staticmethod
    def qkv_args(pa: dict[str, str], in_, bias) -> list:
        """QKVParallelLinear(hidden, head_size, total heads[, total kv heads], bias=...):
        the sizes the PagedAttention ctor already states, before TP localises them."""
        kv = [pa["num_kv_heads"]] if "num_kv_heads" in pa else []
        return [in_, pa["head_dim"], pa["num_heads"], *kv, kwarg("bias", bias)]

    def fused_ctor(self, f: Fusion) -> cst.Call:
        if f.kind == "qkv":
            pa = self.pa[f.cls]
            return self.ctor(
                "QKVParallelLinear",
                [
                    f.in_,
                    pa["head_dim"],
                    pa["num_heads"],
                    pa.get("num_kv_heads", "None"),
                    kwarg("bias", f.bias),
                ],
            )
        outs = cst.List([cst.Element(expr(o)) for o in f.outs])
        return self.ctor("MergedColumnParallelLinear", [f.in_, outs, kwarg("bias", f.bias)])

    def rewrite_class(self, node: cst.ClassDef) -> cst.ClassDef:
        cls = node.name.value
        methods = methods_of(node)
        init = methods.get("__init__")
        if init is None:
            return node
        pa_call = paged_attention_call(init)
        heads = kv = set()
        # Heads are split over ranks only when the projections leave q/k/v sharded; a
        # plan that gathers them (OLMo-2's colwise_gather_output, for a q/k norm over
        # all heads) runs every head on every rank, and the output linear splits its input.
        localise = pa_call is not None and self.class_has_sharded_producer(cls)
        if pa_call is not None:
            self.pa[cls] = pa_args(pa_call)
        flag = None
        if cls in self.sharded_if:
            self.flag[cls] = flag_name(node)
            flag = f"self.{self.flag[cls]}"
        if localise:
            heads = head_expressions(init, self.pa[cls]["num_heads"])
            kv = head_expressions(init, self.pa[cls].get("num_kv_heads")) - heads
        fusions = self.fusions.get(cls, [])
        rewrites_init = pa_call is not None or fusions or any(c == cls for c, _ in self.decisions)
        if not rewrites_init:
            return node
        new_body = []
        for stmt in node.body.body:
            if isinstance(stmt, cst.FunctionDef) and stmt.name.value == "__init__":
                config = config_of(stmt)
                rewriter = InitRewriter(
                    lambda attr, call, cls=cls, config=config: self.ctor_for(
                        cls, attr, call, config
                    ),
                    self.fused_ctor,
                    fusions,
                )
                stmt = drop_unused_locals(stmt.visit(rewriter), self.orphans)
                if flag:
                    cases = self.sharded_if[cls]
                    stmt = insert_flag(stmt, self.flag[cls], sharded_test(cases, config))
                    self.used |= runtime_names(cases)
                if localise:
                    wrapper = WrapPagedAttention(flag)
                    stmt = stmt.visit(wrapper)
                    self.used |= wrapper.used
            elif isinstance(stmt, cst.FunctionDef):
                for f in fusions:
                    if stmt.name.value == "forward":
                        stmt = split_statement(stmt, f)
                if stmt.name.value == "forward" and cls in self.qkv_single:
                    stmt = stmt.visit(LocalQKVSplit(self.qkv_single[cls]))
                for attr in self.maybe_qkv(cls) if stmt.name.value == "forward" else ():
                    stmt = stmt.visit(GuardedQKVSplit(attr))
                if heads or kv:
                    counter = HeadCounts(heads, kv, flag)
                    stmt = stmt.visit(counter)
                    self.used |= counter.used
            new_body.append(stmt)
        for f in fusions:
            self.used.add("QKVParallelLinear" if f.kind == "qkv" else "MergedColumnParallelLinear")
        return node.with_changes(body=node.body.with_changes(body=new_body))


def _rebase(node: cst.ClassDef) -> cst.ClassDef:
    bases = [
        b.with_changes(value=cst.Name("VocabParallelEmbedding"))
        if (dotted(b.value) or "").split(".")[-1] == "Embedding"
        else b
        for b in node.bases
    ]
    return node.with_changes(bases=bases)


def run(module: cst.Module, ctx: ConversionContext) -> cst.Module:
    p = _TPPass(module, ctx)
    body = [p.rewrite_class(s) if isinstance(s, cst.ClassDef) else s for s in module.body]
    body = [
        _rebase(s) if isinstance(s, cst.ClassDef) and s.name.value in p.vocab_bases else s
        for s in body
    ]
    ctx.stacked_params = [
        (f.fused, member, sid)
        for fs in p.fusions.values()
        for f in fs
        for member, sid in zip(f.members, f.shard_ids)
    ]
    ctx.tp_decisions = {f"{c}.{a}": f"{d.style} ({d.source})" for (c, a), d in p.decisions.items()}
    for fs in p.fusions.values():
        for f in fs:
            ctx.tp_decisions[f"{f.cls}.{f.fused}"] = f"fused {'+'.join(f.members)}"
    return add_import_from(module.with_changes(body=body), p.used, "runtime.parallel")
