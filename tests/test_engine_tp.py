"""Tensor parallelism through the engine: TP=2 over gloo (worker process + rank 0 in
this process) generates the same greedy tokens as TP=1; so does expert parallelism
(EP=2: whole experts per rank) on a mixture-of-experts model."""

from __future__ import annotations

import pytest
from engine_models import build_model_dir, build_tiny_dir

from runtime.engine import LLM, SamplingParams
from runtime.parallel import get_tp_size

PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 45)), [60, 61]]


# One architecture here: the parity suite runs every architecture at TP=2 (model level).
# Async scheduling: every rank reads pending input ids from the sampled ids rank 0
# broadcasts after each step.
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("arch", ["llama"])
def test_tp2_greedy_equals_tp1(tmp_path, arch: str, async_scheduling: bool) -> None:
    model_dir, _ = build_model_dir(arch, tmp_path)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tp1 = LLM(model_dir, kv_cache_memory_bytes=1 << 20)
    expected = [o.token_ids for o in tp1.generate(PROMPTS, params, use_tqdm=False)]
    with LLM(model_dir, tensor_parallel_size=2, kv_cache_memory_bytes=1 << 20,
             max_num_batched_tokens=16, async_scheduling=async_scheduling) as tp2:  # fmt: skip
        assert get_tp_size() == 2
        outs = tp2.generate(PROMPTS, params, use_tqdm=False)
        assert [o.token_ids for o in outs] == expected
        assert tp2.block_manager.num_free_blocks == tp2.block_manager.num_blocks
    assert get_tp_size() == 1  # closing the engine leaves the process group


def _experts_held(llm) -> list[str]:
    """extra_repr of every FusedMoE of rank 0's model (this process)."""
    from runtime.moe import FusedMoE

    model = llm.executor.worker.model
    return [m.extra_repr() for m in model.modules() if isinstance(m, FusedMoE)]


def test_ep2_greedy_equals_tp1(tmp_path) -> None:
    """Qwen3-MoE (8 experts, top-2): TP=1, then TP=2 with expert parallelism (rank 0
    holds experts 0-3, rank 1 experts 4-7, attention sharded by heads) give the same
    greedy tokens."""
    model_dir = build_tiny_dir("qwen3_moe", tmp_path)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tp1 = LLM(model_dir, kv_cache_memory_bytes=1 << 20)
    expected = [o.token_ids for o in tp1.generate(PROMPTS, params, use_tqdm=False)]
    assert all("local_experts=8," in r for r in _experts_held(tp1))
    with LLM(model_dir, tensor_parallel_size=2, kv_cache_memory_bytes=1 << 20,
             max_num_batched_tokens=16, expert_parallel=True) as ep2:  # fmt: skip
        held = _experts_held(ep2)
        assert held and all("local_experts=4," in r and "expert_parallel=True" in r for r in held)
        outs = ep2.generate(PROMPTS, params, use_tqdm=False)
        assert [o.token_ids for o in outs] == expected
    assert get_tp_size() == 1


def test_expert_parallel_needs_an_expert_per_rank(tmp_path) -> None:
    import json

    from runtime.engine.loading import check_model

    model_dir = build_tiny_dir("qwen3_moe", tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    # 4 heads: TP=4 divides them, but 2 experts cannot spread over 4 ranks
    config["num_local_experts"] = 2  # (Qwen3MoeConfig's num_experts, as saved)
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="needs at least 4 experts; the model has 2"):
        check_model(model_dir, 4, expert_parallel=True)
    check_model(model_dir, 2, expert_parallel=True)
    with pytest.raises(ValueError, match="expert_parallel must be a bool"):
        check_model(model_dir, 2, expert_parallel="yes")


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_missing_weight_is_named_on_every_tp_size(tmp_path, tp: int) -> None:
    from safetensors.torch import load_file, save_file

    model_dir, _ = build_model_dir("llama", tmp_path)
    weights = load_file(model_dir / "model.safetensors")
    dropped = "model.layers.1.mlp.down_proj.weight"
    del weights[dropped]
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="down_proj"):
        LLM(model_dir, tensor_parallel_size=tp, kv_cache_memory_bytes=1 << 20)
    assert get_tp_size() == 1
