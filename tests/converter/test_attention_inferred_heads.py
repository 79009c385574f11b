"""attention: when the q view infers the head count (``-1``) and the attention class
takes it as a constructor argument instead of reading the config (biogpt's
``BioGptAttention(embed_dim, num_heads, ..., config)``, ctrl's ``n_head``), the head count
is ``config.num_attention_heads``, which every config answers (attribute_map)."""

import re

from converter.hf.resolve import transformers_root
from converter.passes import attention, imports, select, strip
from converter.pipeline import convert_source


def _paged_attention_args(model_type: str) -> str:
    path = transformers_root() / "models" / model_type / f"modeling_{model_type}.py"
    code = convert_source(
        path.read_text(),
        path,
        model_type,
        stages=[imports.run, select.run, strip.run, attention.run],
    ).code
    return re.search(r"self\.attn = PagedAttention\(([^)]*)\)", code).group(1)


def test_an_inferred_head_count_is_the_configs():
    assert _paged_attention_args("biogpt").split(",")[0].strip() == "config.num_attention_heads"
    assert _paged_attention_args("ctrl").split(",")[0].strip() == "config.num_attention_heads"
