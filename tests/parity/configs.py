"""Tiny random configs, one per architecture of the parity suite.

2 layers, hidden 64, 4 query heads; GQA (2 KV heads, MQA for Gemma) where the family
has it; `initializer_range` 0.2 so logits are O(1-10) and a wrong computation cannot
hide below the tolerance; sliding windows of 4, smaller than the prompts, where the
family has them. Ties follow each family's default, with llama/qwen3 flipped to cover
both ways.
"""

from __future__ import annotations

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

CONFIGS: dict[str, dict] = {
    # word_embed_proj_dim != hidden_size exercises project_in/project_out.
    "opt": dict(
        vocab_size=128,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        init_std=0.2,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        enable_bias=True,
    ),
    "llama": dict(COMMON, tie_word_embeddings=True, attention_bias=True),
    "mistral": dict(COMMON, sliding_window=4),
    # layer 0 full attention, layer 1 sliding (max_window_layers=1).
    "qwen2": dict(COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": dict(COMMON, head_dim=16, tie_word_embeddings=True),
    "gemma": dict(COMMON, head_dim=16, num_key_value_heads=1),
    "gemma2": dict(
        COMMON,
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "phi3": dict(COMMON, sliding_window=4),
}

ARCHS = list(CONFIGS)
