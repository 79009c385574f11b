"""Flatten, entry points: the base model's paged signature and the ``*ForCausalLM``'s
generated ``forward`` / ``compute_logits`` (see converter/passes/flatten/)."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from converter.analysis.ownership import child_class
from converter.context import ConversionContext
from converter.cst_helpers import dotted, flat_statements, nodes_of

LM_FORWARD = """
def forward(
    self,
    input_ids: torch.Tensor,  # [T] tokens of all sequences, flattened
    positions: torch.Tensor,  # [T] 0-based position of each token in its sequence
    kv_caches: list[torch.Tensor],  # per attention layer: [2, num_blocks, block_size, Hkv, D]
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


class RenamePositions(cst.CSTTransformer):
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


def base_signature(ctx: ConversionContext, forward: cst.FunctionDef) -> cst.FunctionDef:
    """``forward(self, input_ids, positions, kv_caches, input_metadata)``; every other
    parameter is removed (recorded in ctx: the pruner treats it as None), except that one
    with a literal default other than None becomes a local bound to it (gemma4's
    ``logits_to_keep = 0``: the paged forward is HF's called without that argument)."""
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
    defaults = [
        cst.SimpleStatementLine([cst.Assign([cst.AssignTarget(p.name)], p.default)])
        for p in params[1:]
        if p.name.value not in keep and p.default is not None and _literal(p.default)
    ]
    body = list(forward.body.body)
    at = 1 if body and m.matches(body[0], m.SimpleStatementLine([m.Expr(m.SimpleString())])) else 0
    body[at:at] = defaults
    return forward.with_changes(
        params=cst.Parameters(params=new), body=forward.body.with_changes(body=body)
    )


def _literal(node: cst.BaseExpression) -> bool:
    """A number, string or bool literal (``-1`` included); None is not one."""
    if isinstance(node, cst.UnaryOperation):
        node = node.expression
    return isinstance(node, (cst.Integer, cst.Float, cst.SimpleString)) or m.matches(
        node, m.Name("True") | m.Name("False")
    )


def lm_methods(ctx: ConversionContext, forward: cst.FunctionDef) -> list[cst.FunctionDef]:
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


def unwrap_outputs(ctx, cls: str, forward: cst.FunctionDef, targets: set[str]) -> cst.FunctionDef:
    """In `cls`'s forward, read the result of a call into `targets` as a tensor."""
    for small in flat_statements(forward.body.body):
        if isinstance(small, (cst.Assign, cst.AnnAssign)) and isinstance(small.value, cst.Call):
            parts = (dotted(small.value.func) or "").split(".")
            hit = parts[0] == "self" and child_class(ctx, cls, parts[1:]) in targets
            name = _assigned_name(cst.SimpleStatementLine([small]))
            if hit and name:
                forward = forward.visit(_Outputs(name))
    return forward
