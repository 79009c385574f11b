"""A tiny modeling file in the transformers 5.x style, with unusual attribute names
(`blocks`, `attn_core`, `head_size`) so tests prove roles are found by structure."""

from __future__ import annotations

import libcst as cst

from converter.analysis import analyze
from converter.context import ConversionContext
from converter.guard import stage_name
from converter.pipeline import STAGES, load_rules

TINY = '''
"""Module docstring."""
from collections.abc import Callable

import torch
from torch import nn

from ...generation import GenerationMixin
from ...masking_utils import create_causal_mask
from ...modeling_layers import GradientCheckpointingLayer
from ...modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from ...modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from ...utils import auto_docstring
from .configuration_tiny import TinyConfig

SCALE_CONST = 2


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    return query, None


def double(x):
    return x * SCALE_CONST


class TinyNorm(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states):
        return hidden_states * self.weight


class TinyAttention(nn.Module):
    """Docstring."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_size**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.resid_drop = nn.Dropout(0.1)

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_size)
        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
        q = q.view(shape).transpose(1, 2)
        k = k.view(shape).transpose(1, 2)
        v = v.view(shape).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, 0)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        attn_output = attn_output.reshape(*input_shape, -1)
        return self.resid_drop(self.out(attn_output)), attn_weights


class TinyBlock(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn_core = TinyAttention(config, layer_idx)
        self.ln = TinyNorm(config.hidden_size)

    def forward(self, hidden_states, attention_mask=None, cache=None, use_cache=False, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.attn_core(self.ln(hidden_states), attention_mask, cache, **kwargs)
        if use_cache:
            hidden_states = hidden_states + 0
        return double(residual + hidden_states)


class TinyPreTrainedModel(PreTrainedModel):
    config: TinyConfig
    base_model_prefix = "backbone"
    _checkpoint_conversion_mapping = {"^old.": "new."}


class TinyModel(TinyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.norms = nn.ModuleList([TinyNorm(config.hidden_size) for _ in range(2)])
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList([TinyBlock(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.post_init()

    @auto_docstring
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        hidden_states = inputs_embeds
        for block in self.blocks:
            hidden_states = block(hidden_states, mask, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class TinyForCausalLM(TinyPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"head.weight": "backbone.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.backbone = TinyModel(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.wte

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, labels=None, **kwargs):
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, **kwargs)
        logits = self.head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class TinyForSequenceClassification(TinyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.backbone = TinyModel(config)


__all__ = ["TinyForCausalLM"]
'''


def prepare(source: str = TINY, upto: str | None = None, through: str | None = None):
    """Parse + analyze `source`, then run the pipeline's stages before `upto` (or through
    `through`; default: through prune, the stages every model needs before TP).
    Returns (module, ctx)."""
    ctx = ConversionContext.from_source(
        source, "modeling_tiny.py", "tiny", "transformers.models.tiny"
    )
    ctx.rules = load_rules()
    module = cst.parse_module(source)
    analyze(module, ctx)
    through = through if through is not None or upto is not None else "prune"
    for stage in STAGES:
        name = stage_name(stage)
        if name == upto:
            break
        module = stage(module, ctx)
        if name == through:
            break
    return module, ctx


def code_of(module: cst.Module, name: str) -> str:
    """Code of the top-level class/def `name`."""
    for stmt in module.body:
        if getattr(getattr(stmt, "name", None), "value", None) == name:
            return module.code_for_node(stmt)
    raise KeyError(name)
