"""`ConversionContext`: the source, the rules, and the facts the passes find and share."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libcst as cst

from converter.cst_helpers import code
from converter.errors import ConversionError


@dataclass
class Child:
    """One ``self.<attr> = <ctor>(...)`` of a class ``__init__`` (the ownership graph's edge).

    ``ctor`` is the callee's code (``"nn.Linear"``, ``"LlamaAttention"``); ``cls`` the local
    class it builds (for ``nn.ModuleList([Cls(...) for ...])`` the element class, with
    ``in_list=True``), else None. ``call`` is the constructor call (the element's call
    for module lists); conditional assignments keep the first non-None constructor, and
    the other local classes the attribute may hold (``A(c) if x else B(c)``, or one
    assignment per arm of an ``if``: DeepSeek's MoE block or dense MLP per layer) are its
    ``alternatives``.
    """

    attr: str
    ctor: str
    cls: str | None
    in_list: bool
    call: cst.Call
    line: int
    alternatives: tuple[str, ...] = ()

    @property
    def classes(self) -> tuple[str, ...]:
        """Every local class the attribute may hold."""
        return ((self.cls,) if self.cls else ()) + self.alternatives


@dataclass
class ClassInfo:
    """A class of the source: its bases (code), owned children and methods."""

    name: str
    bases: list[str]
    children: dict[str, Child]
    methods: list[str]
    line: int
    calls_attention_interface: bool = False
    param_attrs: list[str] = field(default_factory=list)  # self.X = nn.Parameter(...)
    forward_params: list[str] = field(default_factory=list)
    config_reads: set[str] = field(default_factory=set)  # X of config.X / self.config.X


@dataclass
class ConversionContext:
    """Everything passes share. Analysis fills the role fields once, from the original
    source; passes read them and append what they decide (e.g. `paged_attention`)."""

    source_path: str
    model_type: str
    source_text: str
    source_sha256: str
    package: str  # absolute package of the source, e.g. "transformers.models.llama"
    rules: dict[str, Any] = field(default_factory=dict)
    # modules beside a source outside transformers (a model directory's own code): its
    # one-dot imports of them stay relative (converter/hf/local.py)
    local_modules: frozenset[str] = frozenset()

    # --- ownership graph and roles (converter.analysis) ---
    classes: dict[str, ClassInfo] = field(default_factory=dict)
    functions: list[str] = field(default_factory=list)  # module-level defs
    module_symbols: set[str] = field(default_factory=set)  # every module-level binding
    lm_class: str = ""  # "LlamaForCausalLM"
    base_model_path: tuple[
        str, ...
    ] = ()  # what the LM forward calls: ("model",) / ("model", "decoder")
    base_model_attr: str = ""  # first element of base_model_path ("model")
    base_model_class: str = ""  # class the LM forward calls ("LlamaModel", "OPTDecoder")
    stack_class: str = ""  # owner of the decoder-layer ModuleList
    stack_attr: str = ""  # "layers" / "h"
    stack_path: tuple[str, ...] = ()  # from the LM class: ("model", "layers")
    decoder_layer_class: str = ""
    attention_classes: list[str] = field(default_factory=list)
    # module-level dicts of classes -> the class `TABLE[key](...)` builds (analysis)
    dispatch: dict[str, str] = field(default_factory=dict)
    eager_attention: bool = False  # attention classes are hand-written softmax cores
    attention_attr: str = ""  # the decoder layer's attribute holding attention ("self_attn")
    # decoder layers holding several attentions in a list, each with its own KV cache
    # (converter/analysis/layer_attentions.py): "Layer.attr" of each such list, and per
    # attention class the __init__ expression of its cache index ("layer_idx")
    attention_lists: list[str] = field(default_factory=list)
    cache_index: dict[str, str] = field(default_factory=dict)
    mlp_classes: list[str] = field(default_factory=list)
    norm_classes: list[str] = field(default_factory=list)
    rotary_classes: list[str] = field(default_factory=list)

    # --- PreTrainedModel facts, read by select before the class is dropped ---
    hf_attrs: dict[str, Any] = field(default_factory=dict)  # every literal class attribute
    base_model_prefix: str = ""
    # the LM class's config class (its __init__'s annotation) and that class's model_type,
    # the key transformers looks checkpoint conversions up by ("aria_text" in aria's file)
    config_class: str = ""
    config_model_type: str = ""
    tied_weights_keys: dict[str, str] = field(default_factory=dict)
    checkpoint_conversion_mapping: dict[str, str] = field(default_factory=dict)
    tp_plan: dict[str, str] = field(default_factory=dict)  # the LM class's `_tp_plan`
    keys_to_ignore_on_load_unexpected: list[str] = field(default_factory=list)
    keys_to_ignore_on_load_missing: list[str] = field(default_factory=list)

    # --- decisions of the passes ---
    kwargs_stripped: set[str] = field(default_factory=set)  # "Class.forward" lost **kwargs
    # class -> its PagedAttention's arguments (name -> expression)
    paged_attention: dict[str, dict[str, cst.BaseExpression]] = field(default_factory=dict)
    removed_params: dict[str, list[str]] = field(default_factory=dict)  # qualname -> params
    # the TP pass (passes/tp/): (fused attr, checkpoint attr, shard id) per fused projection,
    # e.g. ("qkv_proj", "q_proj", "q"), and "Class.attr" -> "style (source)".
    stacked_params: list[tuple[str, str, object]] = field(default_factory=list)
    # the moe pass: (FusedMoE parameter, checkpoint tensor, shard id code) per 2-D experts
    # tensor, relative to the module owning the experts ("experts.gate_up_proj",
    # "experts.mlp.w1", "FlatExperts(0, 2)")
    expert_checkpoint: list[tuple[str, str, str]] = field(default_factory=list)
    tp_decisions: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    # first line of a statement's code (per enclosing def) -> line in the source
    line_index: dict[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def from_source(
        cls, source_text: str, source_path: str | Path, model_type: str, package: str
    ) -> ConversionContext:
        sha = hashlib.sha256(source_text.encode()).hexdigest()
        return cls(str(source_path), model_type, source_text, sha, package)

    def line_of(self, node: cst.CSTNode, scope: str = "") -> int | None:
        """Best-effort source line of a (possibly rewritten) statement: by its first code
        line within `scope`, then anywhere."""
        key = first_line(node)
        return self.line_index.get((scope, key)) or self.line_index.get(("", key))

    def error(
        self,
        message: str,
        node: cst.CSTNode | None = None,
        *,
        scope: str = "",
        hint: str | None = None,
        line: int | None = None,
    ) -> ConversionError:
        construct = first_line(node) if node is not None else None
        if line is None and node is not None:
            line = self.line_of(node, scope)
        return ConversionError(
            message, path=self.source_path, line=line, construct=construct, hint=hint
        )


def first_line(node: cst.CSTNode) -> str:
    """First non-decorator, non-comment line of a node's code, stripped."""
    source = node.code if isinstance(node, cst.Module) else code(node)
    for raw in source.splitlines():
        text = raw.strip()
        if text and not text.startswith(("#", "@")):
            return text
    return ""
