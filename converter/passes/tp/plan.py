"""Which tensor-parallel style each linear / embedding of a module gets, and why.

Sources, first match wins (see rules/tp.toml):
  1. the per-architecture override in rules/architectures.toml;
  2. the config class's ``base_model_tp_plan`` (and the LM class's ``_tp_plan``);
  3. rules/tp.toml names;
  4. the dataflow rule (`converter.passes.tp.dataflow`).
When a name rule and the dataflow rule both answer and disagree, conversion stops:
one of them is wrong about this file, and a wrong style computes wrong logits at TP > 1.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import libcst as cst

from converter.context import ConversionContext
from converter.cst_helpers import code, ctor_call, dotted, methods_of, self_attr
from converter.hf.tables import config_tp_plan
from converter.passes.tp.cases import plan_override
from converter.passes.tp.dataflow import dataflow_styles
from converter.passes.tp.linear_subclasses import linear_subclasses

LINEAR_CTORS = frozenset({"nn.Linear", "torch.nn.Linear", "Linear"})
# GPT-2-style Conv1D(nf=out, nx=in): a linear whose weight is stored [in, out]
CONV1D_CTORS = frozenset({"Conv1D", "pytorch_utils.Conv1D"})
EMBEDDING_CTORS = frozenset({"nn.Embedding", "torch.nn.Embedding", "Embedding"})

# HF plan words -> what the TP pass does with them.
PLAN_STYLES = {
    "colwise": "colwise",
    "rowwise": "rowwise",
    "colwise_gather_output": "colwise_gather_output",
    "rowwise_split_input": "rowwise_split_input",
    "embedding_rowwise": "vocab",
    "replicated_with_grad_allreduce": "replicated",
    "colwise_rep": "colwise_gather_output",
    "rowwise_rep": "rowwise",
    "local_colwise": "colwise",
    "local_rowwise": "rowwise",
    # MLA's latent projection (kv_lora_rank + rope dims, shared by every head): replicated;
    # transformers' style only averages the rope part's gradient, a training concern.
    "mla_kv_a_proj": "replicated",
    "colwise_qkv": "colwise_qkv",  # [Q|K|V] cut per segment (converter/passes/tp/cases.py)
}


@dataclass
class Site:
    """A `self.<attr> = nn.Linear(...)` / embedding construction in `<cls>.__init__`."""

    cls: str
    attr: str
    kind: str  # "linear" | "embedding"
    call: cst.Call
    paths: list[tuple[str, ...]]  # module paths from the LM class ("*" = any layer index)


@dataclass
class Decision:
    style: str  # colwise | rowwise | colwise_gather_output | rowwise_split_input |
    #             replicated | vocab | lm_head
    source: str  # where the style came from (for the conversion log and the report)
    cases: tuple = ()  # style "conditional": its Cases (converter/passes/tp/cases.py)


def embedding_subclasses(module: cst.Module) -> set[str]:
    """Local classes deriving from nn.Embedding (Gemma's scaled embedding, OPT positions)."""
    out = set()
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef):
            bases = {dotted(b.value) for b in stmt.bases}
            if bases & EMBEDDING_CTORS:
                out.add(stmt.name.value)
    return out


def class_paths(ctx: ConversionContext) -> dict[str, list[tuple[str, ...]]]:
    """Every module path (from the LM class) at which each local class is instantiated."""
    paths: dict[str, list[tuple[str, ...]]] = {ctx.lm_class: [()]}
    queue: deque[tuple[str, tuple[str, ...]]] = deque([(ctx.lm_class, ())])
    while queue:
        cls, path = queue.popleft()
        for child in ctx.classes[cls].children.values():
            if len(path) > 12:
                continue
            sub = path + (child.attr, "*") if child.in_list else path + (child.attr,)
            for child_cls in child.classes:  # every class the attribute may hold
                paths.setdefault(child_cls, []).append(sub)
                queue.append((child_cls, sub))
    return paths


def collect_sites(module: cst.Module, ctx: ConversionContext) -> list[Site]:
    """Linear and embedding constructions of classes reachable from the LM class."""
    paths = class_paths(ctx)
    embed_classes = embedding_subclasses(module)
    linear_classes = linear_subclasses(module)
    sites = []
    for stmt in module.body:
        if not isinstance(stmt, cst.ClassDef) or stmt.name.value not in paths:
            continue
        init = methods_of(stmt).get("__init__")
        if init is None:
            continue
        for assign in _assigns(init):
            attr = self_attr(assign.targets[0].target) if len(assign.targets) == 1 else None
            call = ctor_call(assign.value)
            if attr is None or call is None:
                continue
            ctor = dotted(call.func) or ""
            kind = (
                "linear"
                if ctor in LINEAR_CTORS or ctor in CONV1D_CTORS or ctor in linear_classes
                else "embedding"
                if ctor in EMBEDDING_CTORS or ctor in embed_classes
                else None
            )
            if kind:
                cls = stmt.name.value
                site_paths = [p + (attr,) for p in paths[cls]]
                sites.append(Site(cls, attr, kind, call, site_paths))
    return sites


def _assigns(fn: cst.FunctionDef) -> list[cst.Assign]:
    """Assignments of a function body, including those under if/else (no traversal of
    expressions: ctor assignments are statements)."""
    found: list[cst.Assign] = []
    stack: list[cst.CSTNode] = list(fn.body.body)
    while stack:
        stmt = stack.pop(0)
        if isinstance(stmt, cst.SimpleStatementLine):
            found += [s for s in stmt.body if isinstance(s, cst.Assign)]
        elif isinstance(stmt, cst.If):
            stack += list(stmt.body.body)
            if stmt.orelse is not None:
                stack += (
                    [stmt.orelse]
                    if isinstance(stmt.orelse, cst.If)
                    else list(stmt.orelse.body.body)
                )
        elif isinstance(stmt, cst.Else):
            stack += list(stmt.body.body)
    return found


def _match(pattern: str, path: tuple[str, ...]) -> bool:
    parts = pattern.split(".")
    return len(parts) == len(path) and all(p == "*" or p == q for p, q in zip(parts, path))


def _lookup(plan: dict[str, str], paths: list[tuple[str, ...]]) -> str | None:
    styles = {style for pattern, style in plan.items() for p in paths if _match(pattern, p)}
    if len(styles) > 1:
        raise ValueError(f"conflicting plan entries {sorted(styles)}")
    return styles.pop() if styles else None


def resolve_plan(module: cst.Module, ctx: ConversionContext) -> dict[tuple[str, str], Decision]:
    """(class, attr) -> Decision for every linear and embedding site."""
    arch_rules = ctx.rules.get("architectures", {}).get(ctx.model_type, {})
    try:
        override = plan_override(arch_rules.get("tp_plan", {}))
    except ValueError as e:
        raise ctx.error(f"rules/architectures.toml [{ctx.model_type}] {e}") from None
    base_plan = config_tp_plan(ctx.model_type, ctx.config_class) or {}
    lm_plan = dict(ctx.tp_plan)
    tp_rules = ctx.rules.get("tp", {})
    names = {attr: style for style, attrs in tp_rules.get("styles", {}).items() for attr in attrs}
    token_names = set(tp_rules.get("embedding", {}).get("token", []))
    feeds: dict[tuple[str, str], set[str]] = {}
    flow = dataflow_styles(module, ctx, feeds)
    prefix = ctx.base_model_prefix or ctx.base_model_attr

    def relative(paths: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        return [p[1:] for p in paths if p and p[0] == prefix]

    decisions: dict[tuple[str, str], Decision] = {}
    sites = collect_sites(module, ctx)
    head = _lm_head(sites, ctx)
    token = _token_embedding(sites, ctx, token_names)
    for site in sites:
        key = (site.cls, site.attr)
        where = f"{site.cls}.{site.attr}"
        if site is head:
            decisions[key] = Decision("lm_head", "the LM class's output projection")
            continue
        if site.kind == "embedding":
            is_token = site is token
            decisions[key] = Decision(
                "vocab" if is_token else "replicated",
                "token embedding" if is_token else "not the token embedding (stays replicated)",
            )
            continue
        rel = relative(site.paths)
        try:
            found = (
                # a module outside the base model (an LM-level head) by its path from the LM
                (_lookup(override, rel or site.paths), "rules/architectures.toml tp_plan"),
                (_lookup(base_plan, rel), "config base_model_tp_plan"),
                (_lookup(lm_plan, site.paths), "LM _tp_plan"),
            )
        except ValueError as e:
            raise ctx.error(
                f"{where}: {e}", hint="add a tp_plan override in rules/architectures.toml"
            ) from None
        style, source = next(((s, src) for s, src in found if s), (None, ""))
        if isinstance(style, tuple):
            decisions[key] = Decision("conditional", source, style)
            continue
        if style is not None:
            if style not in PLAN_STYLES:
                raise ctx.error(
                    f"{where}: unknown tensor-parallel plan style {style!r}",
                    hint="map it in converter/passes/tp/plan.py PLAN_STYLES or override it in rules/architectures.toml",
                )
            decisions[key] = Decision(PLAN_STYLES[style], source)
            continue
        by_name, by_flow = names.get(site.attr), flow.get(key)
        if by_name and by_flow and by_name != by_flow:
            raise ctx.error(
                f"{where}: rules/tp.toml says {by_name} but the dataflow rule says {by_flow}",
                hint="add a tp_plan override for it in rules/architectures.toml",
            )
        if by_name or by_flow:
            decisions[key] = Decision(
                by_name or by_flow, "rules/tp.toml" if by_name else "dataflow"
            )
        else:
            decisions[key] = Decision("replicated", "no rule names it")
    _unpair_column_chains(decisions, feeds)
    _check_pairs(decisions, flow, ctx)
    return decisions


def _unpair_column_chains(
    decisions: dict[tuple[str, str], Decision], feeds: dict[tuple[str, str], set[str]]
) -> None:
    """A linear the dataflow rule made column-parallel whose output reaches a linear a plan
    or a name made column-parallel too stays replicated: the rule paired it with a
    consumer that takes the whole input (MLA's ``q_a_proj`` -> norm -> ``q_b_proj``, the
    norm needing every feature of the low-rank query)."""
    for key, decision in list(decisions.items()):
        if decision.source != "dataflow" or decision.style != "colwise":
            continue
        consumers = [decisions.get((key[0], b)) for b in sorted(feeds.get(key, ()))]
        column = [
            b
            for b, d in zip(sorted(feeds.get(key, ())), consumers, strict=True)
            if d is not None and d.style.startswith("colwise") and d.source != "dataflow"
        ]
        if column:
            decisions[key] = Decision(
                "replicated", f"dataflow: feeds {', '.join(column)}, column-parallel by its plan"
            )


def _check_pairs(
    decisions: dict[tuple[str, str], Decision],
    flow: dict[tuple[str, str], str],
    ctx: ConversionContext,
) -> None:
    """A sharded (column) output must be consumed by a row-parallel linear in the same class."""
    by_class: dict[str, set[str]] = {}
    for (cls, _), d in decisions.items():
        by_class.setdefault(cls, set()).add(d.style)
    for cls, styles in by_class.items():
        if "colwise" in styles and not styles & {"rowwise", "rowwise_split_input"}:
            if not any(c == cls and s == "rowwise" for (c, _), s in flow.items()):
                ctx.log.append(
                    f"tp: {cls} has column-parallel linears but no row-parallel one here"
                )


def _lm_head(sites: list[Site], ctx: ConversionContext) -> Site | None:
    heads = [s for s in sites if s.cls == ctx.lm_class and s.kind == "linear"]
    tied = {k.rsplit(".", 1)[0] for k in ctx.tied_weights_keys}
    named = [s for s in heads if (s.attr,) in {tuple(t.split(".")) for t in tied}]
    if named:
        return named[0]
    return heads[0] if len(heads) == 1 else None


def _token_embedding(
    sites: list[Site], ctx: ConversionContext, token_names: set[str]
) -> Site | None:
    """The embedding the LM head is tied to, else the one sized by vocab_size, else by name."""
    embeddings = [s for s in sites if s.kind == "embedding"]
    tied = {v.rsplit(".", 1)[0] for v in ctx.tied_weights_keys.values()}
    for s in embeddings:
        if any(".".join(p) in tied for p in s.paths):
            return s
    sized = [s for s in embeddings if s.call.args and "vocab" in code(s.call.args[0].value)]
    if len(sized) == 1:
        return sized[0]
    named = [s for s in embeddings if s.attr in token_names]
    return named[0] if len(named) == 1 else None
