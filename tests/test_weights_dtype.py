"""A checkpoint tensor of the wrong kind of dtype is named, not silently cast."""

import pytest
import torch

from runtime.parallel import default_weight_loader
from runtime.parallel.weights import make_param


def test_float_checkpoints_cast_to_the_parameter_dtype():
    param = make_param(2, 3, dtype=torch.float32)
    default_weight_loader(param, torch.ones(2, 3, dtype=torch.bfloat16))
    assert param.dtype == torch.float32 and bool((param == 1).all())


def test_integer_checkpoint_for_a_float_parameter_names_both_dtypes_and_shapes():
    param = make_param(2, 3, dtype=torch.float32)
    with pytest.raises(
        ValueError,
        match=r"dtype mismatch: parameter torch.float32 \(2, 3\) vs checkpoint torch.int64 \(2, 3\)",
    ):
        default_weight_loader(param, torch.ones(2, 3, dtype=torch.int64))


def test_generated_load_weights_prefixes_the_parameter_name(tmp_path):
    from transformers import LlamaConfig

    from generated.llama import LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config)
    bad = [("model.norm.weight", torch.ones(16, dtype=torch.int32))]
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*dtype mismatch"):
        model.load_weights(bad)
