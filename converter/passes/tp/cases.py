"""Tensor-parallel styles chosen by the config when the model is built.

One generated module serves every config of its type, and some projections hold
layouts a config flag chooses (Falcon's fused QKV: grouped, multi-query or interleaved
per head). A rules/architectures.toml tp_plan entry may then list cases instead of one
style, first true condition wins, the last case without a condition:

    "h.*.attn.qkv" = [
        ["colwise", "config.grouped and config.num_kv_heads % get_tp_size() == 0"],
        ["colwise_qkv", "config.multi_query"],
        ["colwise_gather_output"],
    ]

Conditions are Python expressions over `__init__`'s names (`config`, `self.<attr>`) and
`get_tp_size()`. Only column styles may be cases: `colwise` (contiguous chunks of the
output: whole heads / whole KV groups where the layout keeps them together),
`colwise_qkv` (a [Q|K|V] output cut per segment, `QKVParallelLinear` with the
attention's head counts: one K/V head replicates) and `colwise_gather_output` (every
head on every rank). Whether the class's heads are split is then a build-time flag,
`sharded_expression`, that the TP pass stores on the module and passes to the head-count
helpers and to the row-parallel consumer's `input_is_parallel`.
"""

from __future__ import annotations

CASE_STYLES = ("colwise", "colwise_qkv", "colwise_gather_output")
Case = tuple[str, str]  # (style, condition; "" for the last case)


def parse_cases(value: object) -> tuple[Case, ...]:
    """A plan entry's cases; ValueError (one line, what to write) if malformed."""
    form = 'a list of ["<style>", "<condition>"] pairs ending with ["<style>"]'
    if not isinstance(value, list) or not value:
        raise ValueError(f"a conditional tp_plan entry must be {form}, got {value!r}")
    cases = []
    for i, case in enumerate(value):
        last = i == len(value) - 1
        size = 1 if last else 2
        if (
            not isinstance(case, list)
            or len(case) != size
            or not all(isinstance(c, str) and c for c in case)
        ):
            raise ValueError(f"tp_plan case {case!r} must be {form}")
        if case[0] not in CASE_STYLES:
            raise ValueError(
                f"tp_plan case style {case[0]!r} is not one of {', '.join(CASE_STYLES)}"
            )
        cases.append((case[0], "" if last else case[1]))
    return tuple(cases)


def is_sharded(style: str) -> bool:
    return style != "colwise_gather_output"


def sharded_expression(cases: tuple[Case, ...]) -> str:
    """Python text of "the case the config picks leaves heads sharded over ranks".

    Built from the last case back: a sharded case is `cond or rest`, a gathered one
    `not cond and rest` (conditions parenthesised), constant tails folded away.
    """
    acc = "True" if is_sharded(cases[-1][0]) else "False"
    for style, cond in reversed(cases[:-1]):
        if is_sharded(style):
            acc = (
                "True" if acc == "True" else f"({cond})" if acc == "False" else f"({cond}) or {acc}"
            )
        else:
            rest = f"({acc})" if " or " in acc else acc
            acc = (
                "False"
                if acc == "False"
                else f"not ({cond})"
                if acc == "True"
                else f"not ({cond}) and {rest}"
            )
    return acc


def plan_override(plan: dict[str, object]) -> dict[str, str | tuple[Case, ...]]:
    """A rules tp_plan with its conditional entries as (hashable) cases."""
    return {k: v if isinstance(v, str) else parse_cases(v) for k, v in plan.items()}
