"""Branches around hand-written eager attention cores (converter/passes/attention/eager/).

- `keep_eager_arms`: an if/else whose one arm computes the attention output with a
  softmax and whose other arm assigns the same names without one (a fused kernel such as
  ``F.scaled_dot_product_attention`` behind ``_attn_implementation == "sdpa"``) is one
  computation written twice: the softmax arm, the eager path, stays.
- `merge_arm_args`: an if/else whose arms each hold a core (Falcon's rotary arm and ALiBi
  arm) is rewritten arm by arm; the layer has one `PagedAttention`, so the arms must agree
  on its arguments, except the ALiBi arm's ``alibi`` (and scale), which the rule's
  ``enabled`` config field (the flag under which the model builds the bias) selects.
- `BiasTests`: after the rewrite, the only reads of the ALiBi bias left are tests whether
  there is one (``if alibi is None:``); the layer's ``alibi`` answers that.
"""

from __future__ import annotations

import ast

import libcst as cst
import libcst.matchers as m

from converter.cst_helpers import assigned_names, has_softmax, nodes_of


def _arms(stmt: cst.If) -> list[list[cst.BaseStatement]]:
    orelse = stmt.orelse
    if orelse is None:
        return [list(stmt.body.body)]
    rest = [orelse] if isinstance(orelse, cst.If) else list(orelse.body.body)
    return [list(stmt.body.body), rest]


def keep_eager_arms(body) -> list[cst.BaseStatement]:
    """`body` with each softmax-vs-fused-kernel if/else replaced by its softmax arm."""
    out: list[cst.BaseStatement] = []
    for stmt in body:
        if isinstance(stmt, cst.If) and stmt.orelse is not None and has_softmax(stmt):
            arms = _arms(stmt)
            soft = [i for i, arm in enumerate(arms) if has_softmax(cst.Module(body=arm))]
            if len(soft) == 1 and assigned_names(arms[soft[0]]) & assigned_names(arms[1 - soft[0]]):
                out += keep_eager_arms(arms[soft[0]])
                continue
            stmt = stmt.with_changes(body=stmt.body.with_changes(body=keep_eager_arms(arms[0])))
            orelse = stmt.orelse
            if isinstance(orelse, cst.If):
                orelse = keep_eager_arms([orelse])[0]
            else:
                orelse = orelse.with_changes(
                    body=orelse.body.with_changes(body=keep_eager_arms(orelse.body.body))
                )
            stmt = stmt.with_changes(orelse=orelse)
        out.append(stmt)
    return out


def merge_arm_args(
    ctx, arms: list[dict[str, str]], where: cst.CSTNode, scope: str, config: str = "config"
):
    """One PagedAttention's arguments for cores in several arms of a branch; `config` is
    how the layer's ``__init__`` reads the config (for the rule's ``enabled`` field)."""
    biased = [a for a in arms if "alibi" in a]
    plain = [a for a in arms if "alibi" not in a]
    merged = dict(arms[0])
    for key in sorted(set().union(*arms) - {"alibi", "scale"}):
        values = {a.get(key) for a in arms}
        if len(values) != 1:
            raise ctx.error(
                f"eager attention cores in the arms of one branch disagree on {key}: "
                f"{sorted(str(v) for v in values)}",
                where,
                scope=scope,
                hint="one layer has one PagedAttention; extend converter/passes/attention/eager/arms.py",
            )
    scales = {a["scale"] for a in arms}
    if not biased or not plain:
        if len(scales) != 1 or len({a.get("alibi") for a in arms}) != 1:
            raise ctx.error(
                f"eager attention cores in the arms of one branch use different scales "
                f"{sorted(scales)}",
                where,
                scope=scope,
            )
        return merged
    alibi = ctx.rules.get("architectures", {}).get(ctx.model_type, {}).get("alibi", {})
    field = alibi.get("enabled")
    if not (isinstance(field, str) and field.isidentifier()):
        raise ctx.error(
            "one arm of this branch adds the ALiBi bias and another does not",
            where,
            scope=scope,
            hint="declare enabled = '<config field>' (the flag under which the model builds "
            "the bias) in [<type>.alibi] (rules/architectures.toml)",
        )
    enabled = f"{config}.{field}"
    with_bias, without = biased[0], plain[0]
    if {a["scale"] for a in biased} != {with_bias["scale"]} or {a["scale"] for a in plain} != {
        without["scale"]
    }:
        raise ctx.error(
            "eager attention cores of one kind use different scales", where, scope=scope
        )
    merged["alibi"] = f"{with_bias['alibi']} if {enabled} else None"
    if with_bias["scale"] != without["scale"]:
        merged["scale"] = f"{with_bias['scale']} if {enabled} else {without['scale']}"
    return merged


def same_arms(stmt: cst.If) -> list[cst.BaseStatement]:
    """The if/else as one block when, once rewritten, every arm is the same code (Falcon's
    rotary and ALiBi arms both end as the same paged call) and its tests only read
    values (no calls to skip); else the if/else itself."""
    arms, tests, node = [], [], stmt
    while isinstance(node, cst.If):
        arms.append(list(node.body.body))
        tests.append(node.test)
        node = node.orelse
    if node is None or any(nodes_of(t, cst.Call) for t in tests):
        return [stmt]
    arms.append(list(node.body.body))
    dumps = {ast.dump(ast.parse(cst.Module(body=arm).code)) for arm in arms}
    return arms[0] if len(dumps) == 1 else [stmt]


class BiasTests(cst.CSTTransformer):
    """``bias is None`` / ``bias is not None`` -> the same test on ``self.attn.alibi``."""

    def __init__(self, bias: str) -> None:
        self.bias = bias

    def leave_Comparison(self, original, updated: cst.Comparison) -> cst.BaseExpression:
        test = m.Comparison(
            left=m.Name(self.bias),
            comparisons=[
                m.ComparisonTarget(operator=m.Is() | m.IsNot(), comparator=m.Name("None"))
            ],
        )
        if m.matches(updated, test):
            return updated.with_changes(left=cst.parse_expression("self.attn.alibi"))
        return updated
