"""tp: GPT-2's Conv1D layers (weights stored [in, out]) become parallel layers loaded
transposed; its fused c_attn [Q|K|V] becomes QKVParallelLinear and the forward's split
uses the layer's local sizes."""

from pathlib import Path

import pytest

from converter.pipeline import convert_file

transformers = pytest.importorskip("transformers")
GPT2 = Path(transformers.__file__).parent / "models" / "gpt2" / "modeling_gpt2.py"


def test_conv1d_layers_are_sharded_transposed():
    code = " ".join(convert_file(GPT2).code.split())  # formatting-independent
    assert (
        "self.c_proj = RowParallelLinear(self.embed_dim, self.embed_dim, bias=True, transposed=True)"
        in code
    )
    assert (
        "self.c_fc = ColumnParallelLinear(embed_dim, intermediate_size, bias=True, transposed=True)"
        in code
    )
    assert (
        "QKVParallelLinear(self.embed_dim, self.head_dim, config.num_attention_heads, "
        "bias=True, transposed=True)" in code
    )
    assert "split([self.c_attn.q_size, self.c_attn.kv_size, self.c_attn.kv_size], dim=2)" in code
    assert "self.split_size, dim=2" not in code
