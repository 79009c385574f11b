"""Structural roles of a modeling file, found from the ownership graph (never by names):

- LM class: the ``*ForCausalLM`` (older files: ``*LMHeadModel``);
- attention classes: classes whose methods look up the attention interface;
- decoder stack: the ``nn.ModuleList`` whose element class transitively owns attention
  (the outermost one: a list of attentions inside the decoder layer is
  `converter.analysis.layer_attentions`');
- base model: what the LM forward calls that transitively owns the stack;
- informational: MLP, norm and rotary classes.
"""

from __future__ import annotations

from collections import deque

import libcst as cst

from converter.analysis.ast_facts import INTERFACE_REGISTRY
from converter.analysis.layer_attentions import find_layer_attention_lists
from converter.analysis.ownership import child_class, owns
from converter.context import ConversionContext
from converter.cst_helpers import dotted, methods_of, nodes_of, self_attr


def is_interface_lookup(node: cst.CSTNode) -> bool:
    """``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` or ``ALL_ATTENTION_FUNCTIONS[...]``."""
    if isinstance(node, cst.Call):
        name = dotted(node.func) or ""
        return name.split(".")[0] == INTERFACE_REGISTRY
    if isinstance(node, cst.Subscript):
        return dotted(node.value) == INTERFACE_REGISTRY
    return False


def find_roles(module: cst.Module, ctx: ConversionContext) -> None:
    # transformers' causal-LM head naming: *ForCausalLM, older files *LMHeadModel (GPT-2)
    lms = [c for c in ctx.classes if c.endswith("ForCausalLM")] or [
        c for c in ctx.classes if c.endswith("LMHeadModel")
    ]
    if len(lms) != 1:
        raise ctx.error(
            f"expected exactly one *ForCausalLM class, found {lms or 'none'}",
            hint="convert a file with a single causal-LM head",
        )
    ctx.lm_class = lms[0]
    attention = [c for c, info in ctx.classes.items() if info.calls_attention_interface]
    attention = [c for c in attention if owns(ctx, ctx.lm_class, {c})]
    if not attention:
        # no interface call: classes whose forward holds a hand-written softmax core
        # (Bloom, MPT; converter/passes/attention/eager/ rewrites them)
        attention = [c for c in _softmax_cores(module) if owns(ctx, ctx.lm_class, {c})]
        ctx.eager_attention = bool(attention)
    if not attention:
        raise ctx.error(
            "no attention class calls the attention interface (ALL_ATTENTION_FUNCTIONS) "
            "or computes a softmax core in its forward",
            line=ctx.classes[ctx.lm_class].line,
            hint="extend converter/passes/attention/",
        )
    ctx.attention_classes = attention
    targets = set(attention)
    stacks = [
        (cls, child)
        for cls, info in ctx.classes.items()
        for child in info.children.values()
        if child.in_list
        and child.cls
        and owns(ctx, child.cls, targets)
        and owns(ctx, ctx.lm_class, {cls})
    ]
    # a ModuleList of attention modules inside a decoder layer (several attentions per
    # layer, each with its own KV cache: layer_attentions.py) is not the stack: keep the
    # lists no other list's element class owns
    stacks = [
        (cls, child)
        for cls, child in stacks
        if not any(other is not child and owns(ctx, other.cls, {cls}) for _, other in stacks)
    ]
    if len(stacks) != 1:
        found = [f"{c}.{ch.attr}" for c, ch in stacks]
        raise ctx.error(
            f"expected one ModuleList of decoder layers owning attention, found {found or 'none'}",
            line=ctx.classes[ctx.lm_class].line,
            hint="extend converter/analysis/ for this stack layout",
        )
    ctx.stack_class, stack_child = stacks[0]
    ctx.stack_attr = stack_child.attr
    ctx.decoder_layer_class = stack_child.cls or ""
    ctx.stack_path = tuple(_path_to(ctx, ctx.lm_class, ctx.stack_class)) + (ctx.stack_attr,)
    layer = ctx.classes[ctx.decoder_layer_class]
    direct = [c for c in layer.children.values() if c.cls in targets]
    ctx.attention_attr = direct[0].attr if direct else ""
    find_layer_attention_lists(ctx)
    _find_base_model(module, ctx)
    _require_forwards(module, ctx)
    _find_helpers(ctx)


def _softmax_cores(module: cst.Module) -> list[str]:
    """Classes whose forward calls a softmax, itself or in a ``self.<helper>(...)`` it
    calls (GPT-Neo's ``_attn``): hand-written attention cores."""
    found = []
    for node in module.body:
        methods = methods_of(node) if isinstance(node, cst.ClassDef) else {}
        forward = methods.get("forward")
        calls = nodes_of(forward, cst.Call) if forward is not None else []
        helpers = {self_attr(c.func) for c in calls} & set(methods) - {"forward"}
        calls += [c for h in sorted(helpers) for c in nodes_of(methods[h], cst.Call)]
        names = [c.func.attr if isinstance(c.func, cst.Attribute) else c.func for c in calls]
        if any(isinstance(n, cst.Name) and n.value == "softmax" for n in names):
            found.append(node.name.value)
    return found


def _require_forwards(module: cst.Module, ctx: ConversionContext) -> None:
    """The passes rewrite the forward of every class on the LM -> attention path; one
    without its own forward (deleted, or inherited from a base) cannot be flattened."""
    roles = [ctx.base_model_class, ctx.stack_class, ctx.decoder_layer_class]
    for cls in dict.fromkeys(roles + ctx.attention_classes):
        if "forward" not in ctx.classes[cls].methods:
            node = next(
                s for s in module.body if isinstance(s, cst.ClassDef) and s.name.value == cls
            )
            raise ctx.error(
                f"{cls} has no forward method of its own",
                node,
                line=ctx.classes[cls].line,
                hint="define forward in the class (the passes rewrite it in place)",
            )


def _path_to(ctx: ConversionContext, start: str, goal: str) -> list[str]:
    queue: deque[tuple[str, list[str]]] = deque([(start, [])])
    seen = {start}
    while queue:
        cls, path = queue.popleft()
        if cls == goal:
            return path
        for child in ctx.classes[cls].children.values():
            if child.cls and not child.in_list and child.cls not in seen:
                seen.add(child.cls)
                queue.append((child.cls, path + [child.attr]))
    raise ctx.error(f"{goal} is not reachable from {start} through __init__ attributes")


def _find_base_model(module: cst.Module, ctx: ConversionContext) -> None:
    lm = next(
        s for s in module.body if isinstance(s, cst.ClassDef) and s.name.value == ctx.lm_class
    )
    forward = methods_of(lm).get("forward")
    if forward is None:
        raise ctx.error(f"{ctx.lm_class} has no forward", lm)
    for call in nodes_of(forward, cst.Call):
        name = dotted(call.func) or ""
        parts = name.split(".")
        if parts[0] != "self" or len(parts) < 2:
            continue
        cls = child_class(ctx, ctx.lm_class, parts[1:])
        if cls and owns(ctx, cls, {ctx.stack_class}):
            ctx.base_model_path = tuple(parts[1:])
            ctx.base_model_attr = parts[1]
            ctx.base_model_class = cls
            return
    raise ctx.error(
        f"{ctx.lm_class}.forward calls no base model owning {ctx.stack_class}",
        forward,
        hint="extend converter/analysis/",
    )


def _find_helpers(ctx: ConversionContext) -> None:
    """Informational roles (the TP pass and the report): MLP, norms, rotary."""
    attention = set(ctx.attention_classes)
    for name, info in ctx.classes.items():
        locals_owned = [c for c in info.children.values() if c.cls]
        if info.param_attrs and not locals_owned and not info.children:
            ctx.norm_classes.append(name)
    layer = ctx.classes[ctx.decoder_layer_class]
    for child in layer.children.values():
        if child.cls and child.cls not in attention and child.cls not in ctx.norm_classes:
            if ctx.classes[child.cls].children:
                ctx.mlp_classes.append(child.cls)
    for child in ctx.classes[ctx.stack_class].children.values():
        if child.cls and child.cls not in ctx.norm_classes and not child.in_list:
            # rotary: fed the positions (HF's universal `position_ids` argument name)
            if "position_ids" in ctx.classes[child.cls].forward_params:
                ctx.rotary_classes.append(child.cls)
