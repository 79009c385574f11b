"""Fixtures of the server tests: a real `hf2paged serve` process on loopback over a tiny
random Llama (character tokenizer, a small chat template), and an offline `LLM` on the
same directory whose `generate` is the reference."""

from __future__ import annotations

import pytest
from serve_process import ServerProcess, tiny_chat_model

from runtime.engine import LLM

# Engine settings shared by the server and the offline reference.
ENGINE = dict(block_size=4, max_num_seqs=16)
KV_MIB = 1


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def offline(tiny_model):
    llm = LLM(tiny_model, kv_cache_memory_bytes=KV_MIB << 20, **ENGINE)
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def server(tiny_model):
    args = ["--kv-cache-memory-mib", str(KV_MIB), "--block-size", str(ENGINE["block_size"])]
    args += ["--max-num-seqs", str(ENGINE["max_num_seqs"])]
    with ServerProcess(tiny_model, *args) as proc:
        yield proc
