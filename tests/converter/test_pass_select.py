"""select: dependency closure of the LM class; HF machinery recorded, then dropped."""

from tests.converter.snippets import TINY, code_of, prepare


def test_records_hf_attributes_before_dropping_them():
    module, ctx = prepare(through="select")
    assert ctx.base_model_prefix == "backbone"
    assert ctx.tied_weights_keys == {"head.weight": "backbone.wte.weight"}
    assert ctx.checkpoint_conversion_mapping == {"^old.": "new."}
    assert "TinyPreTrainedModel" not in module.code
    assert "_tied_weights_keys" not in module.code


def test_closure_and_class_rewrites():
    module, _ = prepare(through="select")
    code = module.code
    assert "TinyForSequenceClassification" not in code and "__all__" not in code
    assert '"""' not in code  # docstrings go
    lm = code_of(module, "TinyForCausalLM")
    assert "class TinyForCausalLM(nn.Module):" in lm  # PreTrainedModel + GenerationMixin
    assert "super().__init__()\n        self.config = config" in lm
    assert "post_init" not in lm and "get_input_embeddings" not in lm
    assert "class TinyBlock(nn.Module):" in code  # GradientCheckpointingLayer
    assert "SCALE_CONST = 2" in code  # a module constant a kept helper reads
    assert "from transformers.models.tiny.configuration_tiny import TinyConfig" in code


def test_source_config_store_is_not_doubled():
    source = TINY.replace(
        "        super().__init__(config)\n        self.norms =",
        "        super().__init__(config)\n        self.config = config\n        self.norms =",
    )
    assert source != TINY
    module, _ = prepare(source, through="select")
    assert code_of(module, "TinyModel").count("self.config = config") == 1
    # without the source's own store, select adds the one HF's base class made
    module, _ = prepare(TINY, through="select")
    assert code_of(module, "TinyModel").count("self.config = config") == 1
