"""Pass 4, flatten: the paged entry points and the cache plumbing through the stack.

- classes whose forward calls (through the ownership graph) an attention class, up to the
  decoder layer, take ``kv_cache`` and ``input_metadata`` and pass them on;
- the decoder-stack loop becomes ``for i, layer in enumerate(...)`` passing
  ``kv_cache=kv_caches[i]``; the stack class (and classes above it, up to the base model)
  take ``kv_caches`` and ``input_metadata``;
- the base model's ``position_ids`` is renamed ``positions``;
- the ``*ForCausalLM`` gets the generated ``forward(input_ids, positions, kv_caches,
  input_metadata)`` -> ``[T, hidden]`` (the base model runs on a batch of one, ``[1, T]``)
  and ``compute_logits(hidden_states, input_metadata)``: the rows at
  ``input_metadata.logits_indices``, then the HF forward's statements after the
  base-model call (lm_head and post-processing). The pruner cleans up what they read.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from converter.analysis import child_class, dotted, flat_statements, methods_of, nodes_of
from converter.context import ConversionContext
from converter.cstedit import add_params

KV = [("kv_cache", "torch.Tensor"), ("input_metadata", "InputMetadata")]
KVS = [("kv_caches", "list[torch.Tensor]"), ("input_metadata", "InputMetadata")]
KV_ARGS = "kv_cache=kv_cache, input_metadata=input_metadata"
KVS_ARGS = "kv_caches=kv_caches, input_metadata=input_metadata"

LM_FORWARD = """
def forward(
    self,
    input_ids: torch.Tensor,  # [T] tokens of all sequences, flattened
    positions: torch.Tensor,  # [T] 0-based position of each token in its sequence
    kv_caches: list[torch.Tensor],  # one [2, num_blocks, block_size, Hkv, D] per attention layer
    input_metadata: InputMetadata,
) -> torch.Tensor:
    # The model keeps HF's batch axis as a batch of one: [1, T]
    hidden_states = {call}(
        {ids}=input_ids[None], positions=positions[None], kv_caches=kv_caches, input_metadata=input_metadata
    )
    return hidden_states[0]  # [T, hidden]
"""
COMPUTE_LOGITS = """
def compute_logits(self, hidden_states: torch.Tensor, input_metadata: InputMetadata) -> torch.Tensor:
    hidden_states = hidden_states[input_metadata.logits_indices]  # [N, hidden]
"""


def _callees(ctx: ConversionContext, cls: str, node: cst.CSTNode) -> set[str]:
    """Local classes whose instances `cls`'s method `node` calls (``self.a.b(...)``)."""
    out = set()
    for call in nodes_of(node, cst.Call):
        parts = (dotted(call.func) or "").split(".")
        if parts[0] == "self" and len(parts) > 1:
            target = child_class(ctx, cls, parts[1:])
            if target:
                out.add(target)
    return out


def _closure(callees: dict[str, set[str]], seed: set[str], stop: set[str]) -> set[str]:
    """Classes that (transitively) call into `seed`, not crossing `stop`."""
    marked = set(seed)
    changed = True
    while changed:
        changed = False
        for cls, called in callees.items():
            if cls not in marked and cls not in stop and called & marked:
                marked.add(cls)
                changed = True
    return marked - seed


class _AddKwargs(cst.CSTTransformer):
    """Append `extra` keyword arguments to calls into `targets` (or calls of `names`)."""

    def __init__(self, ctx, cls, targets: set[str], extra: str, names: set[str] = frozenset()):
        self.ctx, self.cls, self.targets, self.names = ctx, cls, targets, names
        self.extra = list(cst.parse_expression(f"f({extra})").args)
        self.count = 0

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        name = dotted(updated.func) or ""
        parts = name.split(".")
        hit = name in self.names or (
            parts[0] == "self"
            and len(parts) > 1
            and child_class(self.ctx, self.cls, parts[1:]) in self.targets
        )
        if not hit:
            return updated
        self.count += 1
        args = list(updated.args)
        star = [a for a in args if a.star == "**"]
        args = [a for a in args if a.star != "**"]
        if args:
            args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return updated.with_changes(args=[*args, *self.extra, *star])


def _stack_loop(ctx: ConversionContext, forward: cst.FunctionDef) -> cst.FunctionDef:
    stack = m.Attribute(value=m.Name("self"), attr=m.Name(ctx.stack_attr))
    iterable = stack | m.Subscript(value=stack)
    loops: list[cst.For] = []

    for node in nodes_of(forward, cst.For):
        it = node.iter
        if m.matches(it, iterable) or m.matches(
            it, m.Call(func=m.Name("enumerate"), args=[m.Arg(iterable)])
        ):
            loops.append(node)
    scope = f"{ctx.stack_class}.forward"
    if len(loops) != 1:
        raise ctx.error(
            f"expected one loop over self.{ctx.stack_attr}, found {len(loops)}",
            forward,
            scope=scope,
            hint="extend converter/passes/flatten.py",
        )
    loop = loops[0]
    if m.matches(loop.iter, m.Call(func=m.Name("enumerate"))):
        if not m.matches(loop.target, m.Tuple(elements=[m.Element(m.Name()), m.Element(m.Name())])):
            raise ctx.error(
                "enumerate loop over the stack without (index, layer) names", loop, scope=scope
            )
        index, layer = (e.value.value for e in loop.target.elements)
        new_loop = loop
    else:
        if not isinstance(loop.target, cst.Name):
            raise ctx.error("stack loop target is not a name", loop, scope=scope)
        index, layer = "i", loop.target.value
        new_loop = loop.with_changes(
            target=cst.parse_expression(f"({index}, {layer})").with_changes(lpar=[], rpar=[]),
            iter=cst.Call(cst.Name("enumerate"), [cst.Arg(loop.iter)]),
        )
    adder = _AddKwargs(
        ctx,
        ctx.stack_class,
        set(),
        f"kv_cache=kv_caches[{index}], input_metadata=input_metadata",
        {layer},
    )
    new_loop = new_loop.with_changes(body=new_loop.body.visit(adder))
    if adder.count != 1:
        raise ctx.error(f"the stack loop calls its layer {adder.count} times", loop, scope=scope)

    class _Swap(cst.CSTTransformer):
        def leave_For(self, original, updated):
            return new_loop if original is loop else updated

    return forward.visit(_Swap())


class _RenamePositions(cst.CSTTransformer):
    """``position_ids`` -> ``positions`` (parameter and reads; callee keywords and
    attribute names stay)."""

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.Name:
        return (
            updated.with_changes(value="positions") if updated.value == "position_ids" else updated
        )

    def leave_Arg(self, original: cst.Arg, updated: cst.Arg) -> cst.Arg:
        # keep callee keyword names (`position_ids=positions`)
        return updated.with_changes(keyword=original.keyword)

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.Attribute:
        return updated.with_changes(attr=original.attr)


def _base_signature(ctx: ConversionContext, forward: cst.FunctionDef) -> cst.FunctionDef:
    """``forward(self, input_ids, positions, kv_caches, input_metadata)``; every other
    parameter is removed (recorded in ctx: the pruner treats it as None)."""
    params = forward.params.params
    ids = ctx.classes[ctx.base_model_class].forward_params[1]  # HF's input_ids
    keep = {
        ids: "torch.Tensor",
        "positions": "torch.Tensor",
        "kv_caches": "list[torch.Tensor]",
        "input_metadata": "InputMetadata",
    }
    names = [p.name.value for p in params[1:]]
    ctx.removed_params[f"{ctx.base_model_class}.forward"] = [n for n in names if n not in keep]
    if forward.params.star_kwarg is not None:
        ctx.removed_params[f"{ctx.base_model_class}.forward"].append(
            forward.params.star_kwarg.name.value
        )
    new = [params[0]] + [
        cst.Param(cst.Name(n), cst.Annotation(cst.parse_expression(a))) for n, a in keep.items()
    ]
    return forward.with_changes(params=cst.Parameters(params=new))


def _lm_methods(ctx: ConversionContext, forward: cst.FunctionDef) -> list[cst.FunctionDef]:
    base = ctx.classes[ctx.base_model_class]
    params = [p for p in base.forward_params if p != "self"]
    # Bloom/MPT (eager cores, ALiBi) have no positions: their bias becomes PA slopes
    if not params or ("position_ids" not in params and not ctx.eager_attention):
        raise ctx.error(
            f"{ctx.base_model_class}.forward has no position_ids parameter",
            forward,
            hint="models that derive positions themselves need a flatten extension",
        )
    call = "self." + ".".join(ctx.base_model_path)
    new_forward = cst.parse_module(LM_FORWARD.format(call=call, ids=params[0])).body[0]
    body = list(forward.body.body)
    index = next((i for i, s in enumerate(body) if _has_call(s, call)), None)
    if index is None:
        raise ctx.error(f"{ctx.lm_class}.forward does not call {call} at top level", forward)
    result = _assigned_name(body[index])
    if result is None:
        raise ctx.error("the base-model call's result is not assigned to a name", body[index])
    tail = [s.visit(_Outputs(result, "hidden_states")) for s in body[index + 1 :]]
    tail = [
        s
        for s in tail
        if not m.matches(
            s,
            m.SimpleStatementLine(
                [m.Assign([m.AssignTarget(m.Name("hidden_states"))], m.Name("hidden_states"))]
            ),
        )
    ]
    logits = cst.parse_module(COMPUTE_LOGITS).body[0]
    logits = logits.with_changes(body=logits.body.with_changes(body=[*logits.body.body, *tail]))
    return [new_forward, logits]


def _has_call(stmt: cst.CSTNode, name: str) -> bool:
    return any(dotted(c.func) == name for c in nodes_of(stmt, cst.Call))


def _assigned_name(stmt: cst.CSTNode) -> str | None:
    if m.matches(stmt, m.SimpleStatementLine([m.Assign([m.AssignTarget(m.Name())])])):
        return stmt.body[0].targets[0].target.value
    if m.matches(stmt, m.SimpleStatementLine([m.AnnAssign(target=m.Name())])):
        return stmt.body[0].target.value
    return None


class _Outputs(cst.CSTTransformer):
    """``outputs.last_hidden_state`` / ``outputs[0]`` -> `replacement` (default: the name
    itself): the flattened forwards return the hidden states, not an output dataclass."""

    def __init__(self, name: str, replacement: str | None = None) -> None:
        self.name = name
        self.replacement = replacement or name

    def leave_Attribute(self, original, updated):
        if m.matches(updated, m.Attribute(m.Name(self.name), m.Name("last_hidden_state"))):
            return cst.Name(self.replacement)
        return updated

    def leave_Subscript(self, original, updated):
        zero = m.Subscript(m.Name(self.name), [m.SubscriptElement(m.Index(m.Integer("0")))])
        return cst.Name(self.replacement) if m.matches(updated, zero) else updated


def _unwrap_outputs(ctx, cls: str, forward: cst.FunctionDef, targets: set[str]) -> cst.FunctionDef:
    """In `cls`'s forward, read the result of a call into `targets` as a tensor."""
    for small in flat_statements(forward.body.body):
        if isinstance(small, (cst.Assign, cst.AnnAssign)) and isinstance(small.value, cst.Call):
            parts = (dotted(small.value.func) or "").split(".")
            hit = parts[0] == "self" and child_class(ctx, cls, parts[1:]) in targets
            name = _assigned_name(cst.SimpleStatementLine([small]))
            if hit and name:
                forward = forward.visit(_Outputs(name))
    return forward


def run(module: cst.Module, ctx: ConversionContext) -> cst.Module:
    classes = {s.name.value: s for s in module.body if isinstance(s, cst.ClassDef)}
    forwards = {
        c: methods_of(n)["forward"] for c, n in classes.items() if "forward" in methods_of(n)
    }
    attention = set(ctx.attention_classes)
    callees = {c: _callees(ctx, c, f) for c, f in forwards.items()}
    kv_users = _closure(callees, attention, {ctx.stack_class, ctx.lm_class})
    above = _closure(callees, {ctx.stack_class}, {ctx.lm_class})
    new_forward: dict[str, cst.FunctionDef] = {}
    for cls in kv_users:
        adder = _AddKwargs(ctx, cls, attention | kv_users, KV_ARGS)
        new_forward[cls] = add_params(forwards[cls].visit(adder), KV)
    stack = add_params(_stack_loop(ctx, forwards[ctx.stack_class]), KVS)
    new_forward[ctx.stack_class] = stack
    for cls in above:
        adder = _AddKwargs(ctx, cls, above | {ctx.stack_class}, KVS_ARGS)
        forward = _unwrap_outputs(ctx, cls, forwards[cls].visit(adder), above | {ctx.stack_class})
        new_forward[cls] = add_params(forward, KVS)
    base = ctx.base_model_class
    new_forward[base] = _base_signature(
        ctx, new_forward.get(base, forwards[base]).visit(_RenamePositions())
    )
    lm_methods = _lm_methods(ctx, forwards[ctx.lm_class])
    body = []
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef) and stmt.name.value in forwards:
            cls = stmt.name.value
            old = forwards[cls]
            if cls == ctx.lm_class:
                inner = []
                for s in stmt.body.body:
                    inner += lm_methods if s is old else [s]
            else:
                inner = [new_forward.get(cls, old) if s is old else s for s in stmt.body.body]
            stmt = stmt.with_changes(body=stmt.body.with_changes(body=inner))
        body.append(stmt)
    return module.with_changes(body=body)
