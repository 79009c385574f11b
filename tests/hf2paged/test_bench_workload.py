"""Benchmark arithmetic: the seeded workload, latency bookkeeping and the HBM roofline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hf2paged.bench import (
    Request,
    RunResult,
    latencies_from_timestamps,
    make_workload,
    percentile,
    preset_config,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_workload_is_seeded_and_in_range() -> None:
    a = make_workload(256, 100, 1024, seed=0, vocab_size=151936)
    assert a == make_workload(256, 100, 1024, seed=0, vocab_size=151936)
    assert a != make_workload(256, 100, 1024, seed=1, vocab_size=151936)
    ins = [len(r.prompt_token_ids) for r in a]
    outs = [r.max_tokens for r in a]
    assert min(ins) >= 100 and max(ins) <= 1024 and min(outs) >= 100 and max(outs) <= 1024
    # Uniform lengths: the mean sits near the middle of the range.
    assert 480 < sum(outs) / len(outs) < 640
    assert max(t for r in a for t in r.prompt_token_ids) < 10_000
    small = make_workload(8, 4, 8, seed=0, vocab_size=50)
    assert max(t for r in small for t in r.prompt_token_ids) < 50


@pytest.mark.parametrize("args", [(0, 1, 2), (4, 0, 2), (4, 5, 4)])
def test_workload_rejects_bad_shapes(args) -> None:
    with pytest.raises(ValueError):
        make_workload(*args, seed=0)


def test_latencies_and_throughput() -> None:
    ttft, itl = latencies_from_timestamps(10.0, [[10.5, 10.7, 11.0], [12.0]])
    assert ttft == [0.5, 2.0]
    assert itl == pytest.approx([0.2, 0.3])
    r = RunResult("x", 2, input_tokens=30, output_tokens=4, elapsed_s=2.0, ttft_s=ttft, itl_s=itl)
    assert r.output_tps == 2.0 and r.total_tps == 17.0
    assert RunResult.from_json(r.to_json()) == r
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_preset_shapes_are_the_real_ones() -> None:
    qwen = preset_config("qwen3-0.6b")
    assert (qwen.num_hidden_layers, qwen.hidden_size, qwen.num_key_value_heads, qwen.head_dim) == (
        28,
        1024,
        8,
        128,
    )
    assert qwen.tie_word_embeddings and qwen.architectures == ["Qwen3ForCausalLM"]
    llama = preset_config("llama3-8b")
    assert (llama.num_hidden_layers, llama.hidden_size, llama.intermediate_size) == (
        32,
        4096,
        14336,
    )
    moe = preset_config("qwen3-30b-a3b")  # Qwen/Qwen3-30B-A3B: 128 experts, top-8
    assert (moe.num_hidden_layers, moe.hidden_size, moe.num_experts, moe.num_experts_per_tok) == (
        48,
        2048,
        128,
        8,
    )
    assert moe.moe_intermediate_size == 768 and moe.architectures == ["Qwen3MoeForCausalLM"]
    with pytest.raises(ValueError, match="unknown model shape"):
        preset_config("gpt-5")


def test_num_layers_cuts_a_shape_and_names_it() -> None:
    from benchmarks.throughput import model_config, model_label, parse_args

    args = parse_args(["--model", "qwen3-30b-a3b", "--num-layers", "8", "--device", "cpu"])
    assert model_config(args).num_hidden_layers == 8 and model_label(args) == "qwen3-30b-a3b-8l"
    whole = parse_args(["--model", "qwen3-30b-a3b", "--device", "cpu"])
    assert model_config(whole).num_hidden_layers == 48 and model_label(whole) == "qwen3-30b-a3b"
    with pytest.raises(SystemExit):
        model_config(parse_args(["--model", "tiny", "--num-layers", "9", "--device", "cpu"]))


def test_serve_benchmark_args_reach_throughputs_workload() -> None:
    """serve.py hands its own arguments to throughput.py's model_config/workload_for."""
    from benchmarks.serve import parse_args
    from benchmarks.throughput import model_config, model_label, workload_for

    args = parse_args(["--model", "qwen3-0.6b", "--device", "cpu", "--num-requests", "3"])
    assert model_label(args) == "qwen3-0.6b"
    assert model_config(args).num_hidden_layers == 28
    assert len(workload_for(args)) == 3


def test_roofline_counts_weights_per_step_and_every_kv_read(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from benchmarks.report import Roofline
    from hf2paged.bench import save_random_model

    config = preset_config("tiny")
    save_random_model(config, tmp_path, torch.float32, "cpu")
    workload = [Request([1] * 3, 2), Request([1] * 5, 4)]
    roof = Roofline.of(tmp_path, config, workload, torch.float32, bandwidth=1e9, tp=1)
    total_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    embed = config.vocab_size * config.hidden_size  # untied: the lookup table is not read per step
    assert roof.weight_bytes == (total_params - embed) * 4
    assert (
        roof.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    )  # layers * (k, v) * kv heads * head_dim * fp32
    assert roof.steps == 4
    # request 1 reads 3 then 4 cached tokens; request 2 reads 5, 6, 7, 8
    assert roof.kv_read_bytes == (3 + 4 + 5 + 6 + 7 + 8) * roof.kv_bytes_per_token
    assert roof.kv_write_bytes == (5 + 9) * roof.kv_bytes_per_token
    expected_s = (4 * roof.weight_bytes + roof.kv_read_bytes + roof.kv_write_bytes) / 1e9
    assert roof.seconds == pytest.approx(expected_s)
    assert roof.output_tps == pytest.approx(6 / expected_s)


def test_throughput_runs_and_kept_results(tmp_path) -> None:
    """--tp 1,2 runs ours per size; --keep-dir results come back only for the same workload."""
    import argparse
    import json

    from benchmarks.runs import earlier_results, ordered, system_runs

    args = argparse.Namespace(systems=["ours", "hf-cb"], tp_sizes=[1, 2])
    assert system_runs(args) == [
        ("ours-tp1", "ours", 1, {}),
        ("ours-tp2", "ours", 2, {}),
        ("hf-cb", "hf-cb", 1, {}),
    ]
    args.tp_sizes = [2]
    assert system_runs(args)[0] == ("ours", "ours", 2, {})
    args.compile_settings = ["0", "1"]  # --compile 0,1: ours once per setting
    assert system_runs(args)[:2] == [
        ("ours-compile0", "ours", 2, {"HF2PAGED_COMPILE": "0"}),
        ("ours-compile1", "ours", 2, {"HF2PAGED_COMPILE": "1"}),
    ]
    args.compile_settings, args.repeat = ["auto"], 3  # --repeat 3: three fresh processes
    assert [key for key, *_ in system_runs(args)] == [
        "ours-run1",
        "ours-run2",
        "ours-run3",
        "hf-cb",
    ]

    result = RunResult("HF generate", 2, input_tokens=3, output_tokens=4, elapsed_s=1.0)
    (tmp_path / "results").mkdir()
    saved = {"workload": "w1", "result": json.loads(result.to_json())}
    (tmp_path / "results" / "hf-generate.json").write_text(json.dumps(saved))
    assert earlier_results(tmp_path, "w2") == {}
    found = earlier_results(tmp_path, "w1")
    assert list(found) == ["hf-generate"] and found["hf-generate"].output_tokens == 4
    rows = {"hf-generate": 1, "hf-cb": 2, "ours-tp2": 3, "ours-tp1": 4}
    assert list(ordered(rows)) == ["ours-tp1", "ours-tp2", "hf-cb", "hf-generate"]


def test_report_spread_of_repeated_runs():
    """--repeat's rows of one setup are gathered into one spread line; single runs give none."""
    from benchmarks.report import _spread

    def run(name, seconds):
        return RunResult(name, 1, input_tokens=1, output_tokens=1000, elapsed_s=seconds)

    results = {
        "ours-run1": run("hf2paged (ours, tp=1, run 1/2)", 1.0),
        "ours-run2": run("hf2paged (ours, tp=1, run 2/2)", 0.8),
        "hf-cb": run("HF continuous batching", 10.0),
    }
    lines = _spread(results)
    assert lines[-1] == (
        "- hf2paged (ours, tp=1): 2 runs, output tok/s 1,000 / 1,250; median 1,125, "
        "spread 22.2% of it"
    )
    assert _spread({"hf-cb": results["hf-cb"]}) == []
