"""`hf2paged serve --tp 2 --expert-parallel` on a tiny Qwen3-MoE (8 experts, top-2): the
engine process starts both ranks with whole experts per rank, and greedy completions
over HTTP equal the offline engine at TP=1 token for token."""

from __future__ import annotations

import httpx
from engine_models import build_tiny_dir
from serve_process import ServerProcess

from runtime.engine import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 45))]


def test_serve_expert_parallel_equals_offline_tp1(tmp_path) -> None:
    model_dir = build_tiny_dir("qwen3_moe", tmp_path)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    offline = LLM(model_dir, kv_cache_memory_bytes=1 << 20, block_size=4)
    expected = [o.token_ids for o in offline.generate(PROMPTS, params, use_tqdm=False)]
    offline.close()
    args = ["--tp", "2", "--expert-parallel", "--kv-cache-memory-mib", "1", "--block-size", "4"]
    with ServerProcess(model_dir, *args) as server:
        for prompt, want in zip(PROMPTS, expected, strict=True):
            body = {
                "model": model_dir.name, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True,
            }  # fmt: skip
            response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["token_ids"] == want


def test_serve_expert_parallel_reaches_the_engine(tmp_path) -> None:
    """The flag is the engine's: two ranks cannot split a one-expert model by whole
    experts, and serve says so in one line instead of starting (without the flag, the
    same model serves at --tp 2: each rank holds a slice of the expert)."""
    import pytest
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = build_tiny_dir("qwen3_moe", tmp_path)  # its tokenizer stays
    config = AutoConfig.from_pretrained(model_dir)
    config.num_experts, config.num_experts_per_tok = 1, 1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    args = ["--tp", "2", "--kv-cache-memory-mib", "1", "--block-size", "4"]
    with pytest.raises(RuntimeError, match="needs at least 2 experts; the model has 1") as err:
        ServerProcess(model_dir, *args, "--expert-parallel", timeout=120)
    assert "Traceback" not in str(err.value)
    with ServerProcess(model_dir, *args) as server:
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
