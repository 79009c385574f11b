"""Stage flatten: the paged entry points and the cache plumbing through the stack.

- classes whose forward calls (through the ownership graph) an attention class, up to the
  decoder layer, take ``kv_cache`` and ``input_metadata`` and pass them on;
- the decoder-stack loop (or loops over slices of the stack) becomes ``for i, layer in
  enumerate(...)`` passing ``kv_cache=kv_caches[i]`` (plus the slice start, plus the
  cache offset where the attention offsets its cache index per application:
  converter/passes/flatten/loops.py, cache_slots.py); the stack class (and classes above
  it, up to the base model) take ``kv_caches`` and ``input_metadata``;
- a decoder layer holding its attentions in a list (several per layer, each with its
  own cache index: converter/analysis/layer_attentions.py) gets the whole ``kv_caches``
  instead, and so do the classes between it and the attentions, which each read their
  own (the attention stage's ``kv_caches[self.attn.kv_cache_index]``);
- the base model's ``position_ids`` is renamed ``positions``; below the stack, HF's
  "arange over the step's tokens + the cache length" reads them instead, threaded down
  like the caches (converter/passes/flatten/positions.py);
- the ``*ForCausalLM`` gets the generated ``forward(input_ids, positions, kv_caches,
  input_metadata)`` -> ``[T, hidden]`` (the base model runs on a batch of one, ``[1, T]``)
  and ``compute_logits(hidden_states, input_metadata)``: the rows at
  ``input_metadata.logits_indices``, then the HF forward's statements after the
  base-model call (lm_head and post-processing). The pruner cleans up what they read.

The last two (the entry points) live in converter/passes/flatten/lm.py.
"""

from __future__ import annotations

import libcst as cst

from converter.analysis.callgraph import loop_layers
from converter.analysis.ownership import child_class
from converter.context import ConversionContext
from converter.cst_helpers import add_params, called_module, methods_of, nodes_of
from converter.passes.flatten.cache_slots import cache_offset, declare_slots
from converter.passes.flatten.lm import RenamePositions, base_signature, lm_methods, unwrap_outputs
from converter.passes.flatten.loops import AddKwargs, stack_loops
from converter.passes.flatten.positions import NAME as POSITIONS
from converter.passes.flatten.positions import rewrite as read_positions

KV = [("kv_cache", "torch.Tensor"), ("input_metadata", "InputMetadata")]
KVS = [("kv_caches", "list[torch.Tensor]"), ("input_metadata", "InputMetadata")]
KV_ARGS = "kv_cache=kv_cache, input_metadata=input_metadata"
KVS_ARGS = "kv_caches=kv_caches, input_metadata=input_metadata"


def _callees(ctx: ConversionContext, cls: str, node: cst.CSTNode) -> set[str]:
    """Local classes whose instances `cls`'s method `node` calls (``self.a.b(...)``,
    ``self.a[0](...)``, or ``m(...)`` in a loop ``for m in self.a``)."""
    out = set(loop_layers(ctx, cls, node).values())
    for call in nodes_of(node, cst.Call):
        parts = (called_module(call.func) or "").split(".")
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


def _thread_positions(ctx, callees, forwards, new_forward: dict[str, cst.FunctionDef]) -> str:
    """``positions`` from the stack loop down to the classes in `new_forward` (updated in
    place); the stack loop's extra keyword argument."""
    users = set(new_forward)
    chain = users | _closure(callees, users, {ctx.stack_class, ctx.lm_class})
    if ctx.stack_class != ctx.base_model_class:
        raise ctx.error(
            f"{sorted(users)[0]} reads the step's token positions below a stack class "
            f"({ctx.stack_class}) other than the base model",
            forwards[ctx.stack_class],
            scope=f"{ctx.stack_class}.forward",
            hint="extend converter/passes/flatten/positions.py to thread positions there",
        )
    for cls in chain:
        forward = new_forward.get(cls, forwards[cls])
        params = [*forward.params.params, *forward.params.kwonly_params]
        if POSITIONS in {p.name.value for p in params}:
            raise ctx.error(
                f"{cls}.forward already has a `{POSITIONS}` parameter",
                forward,
                scope=f"{cls}.forward",
                hint="extend converter/passes/flatten/positions.py to pick a fresh name",
            )
        adder = AddKwargs(ctx, cls, chain, f"{POSITIONS}={POSITIONS}")
        new_forward[cls] = add_params(forward.visit(adder), [(POSITIONS, "torch.Tensor")])
    return f", {POSITIONS}={POSITIONS}"


def run(module: cst.Module, ctx: ConversionContext) -> cst.Module:
    classes = {s.name.value: s for s in module.body if isinstance(s, cst.ClassDef)}
    forwards = {
        c: methods_of(n)["forward"] for c, n in classes.items() if "forward" in methods_of(n)
    }
    attention = set(ctx.attention_classes)
    callees = {c: _callees(ctx, c, f) for c, f in forwards.items()}
    kv_users = _closure(callees, attention, {ctx.stack_class, ctx.lm_class})
    above = _closure(callees, {ctx.stack_class}, {ctx.lm_class})
    below = {c: forwards[c] for c in sorted(kv_users | attention) if c in forwards}
    new_forward = read_positions(ctx, below)  # class -> forward reading `positions`
    extra = ""
    if new_forward:
        extra = _thread_positions(ctx, callees, forwards, new_forward)
    # attentions held in a list per decoder layer pick their own caches from the list
    # (converter/analysis/layer_attentions.py): the layer hands all of them down
    params, args = (KVS, KVS_ARGS) if ctx.attention_lists else (KV, KV_ARGS)
    for cls in kv_users:
        targets = attention | kv_users
        loops = {n for n, c in loop_layers(ctx, cls, forwards[cls]).items() if c in targets}
        adder = AddKwargs(ctx, cls, targets, args, loops)
        new_forward[cls] = add_params(new_forward.get(cls, forwards[cls]).visit(adder), params)
    offset = cache_offset(ctx)
    if offset and ctx.attention_lists:
        raise ctx.error(
            f"attention modules in a list per decoder layer ({ctx.attention_lists[0]}) that "
            f"also offset their cache index by {offset!r}",
            line=ctx.classes[ctx.decoder_layer_class].line,
            hint="extend converter/passes/flatten/cache_slots.py",
        )
    loops = stack_loops(
        ctx, forwards[ctx.stack_class], offset, extra, all_caches=bool(ctx.attention_lists)
    )
    stack = add_params(loops, KVS)
    new_forward[ctx.stack_class] = stack
    for cls in above:
        adder = AddKwargs(ctx, cls, above | {ctx.stack_class}, KVS_ARGS)
        forward = unwrap_outputs(ctx, cls, forwards[cls].visit(adder), above | {ctx.stack_class})
        new_forward[cls] = add_params(forward, KVS)
    base = ctx.base_model_class
    new_forward[base] = base_signature(
        ctx, new_forward.get(base, forwards[base]).visit(RenamePositions())
    )
    lm_defs = lm_methods(ctx, forwards[ctx.lm_class])
    body = []
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef) and stmt.name.value in forwards:
            cls = stmt.name.value
            old = forwards[cls]
            if cls == ctx.lm_class:
                inner = []
                for s in stmt.body.body:
                    is_init = isinstance(s, cst.FunctionDef) and s.name.value == "__init__"
                    inner += (
                        lm_defs
                        if s is old
                        else [declare_slots(ctx, s) if offset and is_init else s]
                    )
            else:
                inner = [new_forward.get(cls, old) if s is old else s for s in stmt.body.body]
            stmt = stmt.with_changes(body=stmt.body.with_changes(body=inner))
        body.append(stmt)
    return module.with_changes(body=body)
