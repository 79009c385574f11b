"""The renames every model shares (transformers' legacy conversion table) live once, in
runtime.checkpoint.LEGACY_RENAMES, and no generated module copies them: the runtime's table
must equal the installed transformers' (a new transformers that changes it fails here, not
as silently unrenamed checkpoint keys)."""

from converter.hf.tables import checkpoint_renames, legacy_renames
from runtime.checkpoint import LEGACY_RENAMES


def test_runtime_legacy_renames_are_transformers():
    assert list(LEGACY_RENAMES) == legacy_renames()


def test_model_renames_leave_the_legacy_table_to_the_runtime():
    for model_type, cls in [("llama", "LlamaForCausalLM"), ("gpt_neox", "GPTNeoXForCausalLM")]:
        pairs = [p for r in checkpoint_renames(cls, model_type) for p in r.regexes()]
        assert not set(pairs) & set(LEGACY_RENAMES)
