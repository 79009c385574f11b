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

# GPT-2-style configs name sizes n_embd/n_layer/n_head/n_positions.
GPT = dict(
    vocab_size=128,
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=128,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
)

# Falcon names its sizes like COMMON but its KV head count `num_kv_heads`.
FALCON = dict(
    vocab_size=128,
    hidden_size=64,
    ffn_hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
)

# A case is named by its key; `model_type` (default: the key) picks the config class,
# so one architecture can be tested under several configurations; `attn_implementation`
# (default "eager") picks the HF reference path; `random_params` names parameters (by
# last name component) drawn from N(0, 1) after HF's init, where that init is a constant.
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
    # --- classic architectures (issue 4) ---
    # Conv1D layers; per-layer scale 1/(layer_idx+1) on top of D**-0.5.
    "gpt2": dict(GPT, scale_attn_by_inverse_layer_idx=True),
    # rotate-every-two rotary on 8 of 16 dims, parallel block, lm_head bias.
    "gptj": dict(GPT, rotary_dim=8),
    "phi": dict(COMMON, qk_layernorm=True),
    # per-head q/k LayerNorms (sliced per rank under TP), parallel residual.
    "stablelm": dict(COMMON, qk_layernorm=True, use_parallel_residual=True, use_qkv_bias=True),
    # fused QKV interleaved per head, partial rotary, parallel residual, 2 norms.
    "gpt_neox": {k: v for k, v in COMMON.items() if k != "num_key_value_heads"},
    # multi-query fused c_attn [Q|K|V] with one K/V head.
    "gpt_bigcode": dict(GPT, multi_query=True),
    "gpt_bigcode_mha": dict(GPT, model_type="gpt_bigcode", multi_query=False),
    # hand-written eager cores with ALiBi (converter/passes/attention/eager/). 6 heads: the
    # non-power-of-2 slope formulas (Bloom's extra slopes, MPT's [1::2] + [::2] order).
    "bloom": dict(
        vocab_size=128,
        hidden_size=48,
        n_layer=2,
        n_head=6,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "mpt": dict(
        vocab_size=128,
        d_model=48,
        n_layers=2,
        n_heads=6,
        max_seq_len=128,
        initializer_range=0.2,
        attn_config={"clip_qkv": 1.0},
    ),
    # Falcon: one generated module for every QKV layout (converter/passes/attention/eager/arms.py).
    # New decoder architecture: grouped fused QKV [kv][q, q, k, v][D], K/V broadcast to
    # every query head before caching, two layer norms, parallel attention + MLP.
    "falcon": dict(
        FALCON,
        new_decoder_architecture=True,
        num_kv_heads=2,
        multi_query=False,
        parallel_attn=True,
    ),
    # Falcon-7B style: multi-query fused QKV [q..., k, v], rotary, parallel attention.
    "falcon_mqa": dict(
        FALCON, model_type="falcon", multi_query=True, parallel_attn=True, tie_word_embeddings=False
    ),
    # Multi-query with 3 heads (Falcon-7B has 71): TP=2 cannot split them, so the config's
    # tp_plan case gathers query_key_value and attention runs whole on every rank.
    "falcon_mqa_odd": dict(
        FALCON,
        model_type="falcon",
        hidden_size=48,
        num_attention_heads=3,
        multi_query=True,
        parallel_attn=True,
    ),
    # Falcon-RW style: ALiBi, old MHA layout (interleaved per head), sequential residual,
    # biases. Compared with HF's sdpa path, transformers' default for Falcon: its eager
    # ALiBi path adds the bias twice (once itself, once inside the mask the model built).
    # 16 heads: slopes 2^(-k/2), inexact in the bfloat16 the builder computes them in.
    "falcon_alibi": dict(
        FALCON,
        model_type="falcon",
        num_attention_heads=16,
        alibi=True,
        multi_query=False,
        parallel_attn=False,
        bias=True,
        attn_implementation="sdpa",
    ),
    # Attention sinks (random per head: HF initialises them to zero), per-layer RoPE
    # theta with a NoPE layer (theta 0), one full and one sliding layer, muP multipliers.
    "granite_swa": dict(
        COMMON,
        layer_types=["full_attention", "sliding_attention"],
        layer_rope_theta=[0, 10000.0],
        sliding_window=4,
        attention_multiplier=0.3,
        embedding_multiplier=2.0,
        residual_multiplier=0.7,
        logits_scaling=1.5,
        random_params=["sinks"],
    ),
    # softmax in an `_attn` helper, no scaling; layer 1 local: a banded causal mask buffer
    # of window 4 (sliding_window), layer 0 global.
    "gpt_neo": dict(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # fused QKV interleaved per head behind a size()[:-1] + (H, 3 * D) view, softmax in an
    # `_attn` helper (torch.baddbmm with alpha=1/norm), partial rotary, the last layer's
    # dense bias returned to the block.
    "gpt_neox_japanese": dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_multiple_size=2,
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Multi-head latent attention (MLA): queries through a low-rank q_a/q_b pair, K/V
    # expanded per head from a shared latent; the value head size (12) differs from the
    # query/key one (16 + 8): PagedAttention(v_head_dim=...), an unpadded D + Dv cache.
    "minicpm3": dict(
        COMMON,
        num_key_value_heads=4,  # HF's eager path repeats K/V by heads // kv_heads
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
    ),
    # q_lora_rank None: a plain q_proj, built in a conditional expression (sharded in it).
    "minicpm3_q_proj": dict(
        COMMON,
        model_type="minicpm3",
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=20,
    ),
    # MLA with interleaved rotary; attention TP plan from rules/architectures.toml.
    "youtu": dict(
        COMMON,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        rope_interleave=True,
    ),
    # fused query_key_value carved per head by indexing ([B, T, H, 3, D][..., i, :]) in a
    # helper, per-head q/k LayerNorms, partial rotary (0.5) by slices put back with cat.
    "persimmon": dict(
        {k: v for k, v in COMMON.items() if k != "num_key_value_heads"}, qk_layernorm=True
    ),
    # eager core: q pre-scaled, its heads split after the cache update and flattened into
    # the batch for bmm; sinusoidal positions (offset 2), scaled embeddings, tied head.
    "xglm": dict(
        vocab_size=128,
        d_model=64,
        ffn_dim=128,
        num_layers=2,
        attention_heads=4,
        max_position_embeddings=128,
        init_std=0.2,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
    # Recurrent H/L stacks of 2 layers, applied H_cycles * (L_cycles + 1) = 6 times per
    # forward, each application in its own caches (12 slots, kv_caches[cycle_offset + i]);
    # a random z_L_init (HF inits it to zeros); the checkpoint transformers saves holds
    # fused gqkv_proj / gate_up_proj, chunked back at load (WeightConverter Chunk).
    # initializer_range 0.1: at 0.2 HF's own fp32 logits differ from fp64 by 6.5e-5 over
    # the 12 layer applications (near the tolerance), at 0.1 by 1.1e-6 (max |logit| 3.8).
    "hrm_text": dict(
        {k: v for k, v in COMMON.items() if k != "num_key_value_heads"},
        head_dim=16,  # its config's default is 128, whatever the hidden size
        H_cycles=2,
        L_cycles=2,
        initializer_range=0.1,
        random_params=["z_L_init"],
    ),
    # Input (1), recurrent (2) and output (1) sections as loops over slices of the
    # stack, the recurrent one run 3 times; sliding windows of 4 on layers 0-2. per_loop:
    # loops 1 and 2 cache in appended copies of the recurrent layers (8 slots). The
    # last_loop mode is tests/parity/test_dory_last_loop.py (HF's cached path differs
    # from its whole-sequence forward there).
    "dory": dict(
        COMMON,
        num_hidden_layers=4,
        head_dim=16,
        n_input_layers=1,
        n_recurrent_layers=2,
        n_output_layers=1,
        n_recurrent_loops=3,
        sliding_window=4,
    ),
    # Differential attention: two interface calls over value halves, one paged attention
    # (values side by side, v_head_dim = 2 * head_dim); 4 KV heads so the halves differ.
    # initializer_range 0.1: at 0.2 HF's own fp32 logits differ from fp64 by 1.2e-4 at
    # prefill (above the tolerance), at 0.1 by 1.7e-6 (max |logit| 2.7).
    "diffllama": dict(COMMON, num_key_value_heads=4, head_dim=16, initializer_range=0.1),
    # GPT-1: an eager core with no KV cache (recomputes the sequence), K stored transposed
    # ([B, H, D, T]), the scale under a constructor flag, the causal buffer blended into
    # the scores (w * b - 1e4 * (1 - b)); Conv1D [Q|K|V] split by size; learned positions.
    "openai-gpt": dict(GPT, afn="gelu"),
}

ARCHS = list(CONFIGS)

# Cases the TP=2 run leaves out, with the reason (an open problem, not a pass).
TP2_SKIP: dict[str, str] = {}
