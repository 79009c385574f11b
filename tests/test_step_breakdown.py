"""benchmarks/step_breakdown.py's trace analysis on a synthetic torch-profiler trace: GPU
kernels attributed to the module range their launch sits in, CUDA-graph kernels matched
to an eager forward, GPU busy time as the union of kernel intervals."""

from __future__ import annotations

import json

from benchmarks.step_breakdown import (
    Phases,
    analyse_trace,
    attributed_kernels,
    category_of,
    relabel_graph_kernels,
)


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def synthetic_trace() -> list[dict]:
    return [
        _x("user_annotation", "step", 0, 1000),
        _x("user_annotation", "host::execute (rest)", 10, 500),
        _x("user_annotation", "mod::Qwen3DecoderLayer", 20, 400),
        _x("user_annotation", "mod::Qwen3RMSNorm", 30, 50),
        _x("cuda_runtime", "cudaLaunchKernel", 40, 5, correlation=1),
        _x("user_annotation", "mod::PagedAttention", 100, 100),
        _x("cuda_driver", "cuLaunchKernelEx", 110, 5, correlation=2),
        _x("cuda_driver", "cuLaunchKernelEx", 150, 5, correlation=3),
        _x("cuda_runtime", "cudaLaunchKernel", 300, 5, correlation=4),  # the layer's own add
        _x("user_annotation", "host::graph inputs + replay", 600, 50),
        _x("cuda_runtime", "cudaGraphLaunch", 610, 10, correlation=5),
        _x("user_annotation", "host::sample", 700, 200),
        _x("cuda_runtime", "cudaLaunchKernel", 710, 5, correlation=6),
        _x("cuda_runtime", "cudaStreamSynchronize", 720, 150),
        # GPU side (tid of the stream)
        _x("kernel", "reduce_kernel", 50, 20, tid=7, correlation=1),
        _x("kernel", "reshape_and_cache_kernel", 120, 10, tid=7, correlation=2),
        _x("kernel", "paged_decode_kernel", 160, 100, tid=7, correlation=3),
        _x("kernel", "vectorized_elementwise_kernel", 320, 10, tid=7, correlation=4),
        _x("kernel", "nvjet_gemm", 620, 30, tid=7, correlation=5),
        _x("kernel", "vectorized_elementwise_kernel", 640, 40, tid=7, correlation=5),
        _x("kernel", "argmax_kernel", 720, 10, tid=7, correlation=6),
    ]


def test_kernels_take_the_category_of_their_innermost_module():
    kernels = {
        k["name"] + str(k["ts"]): k["category"] for k in attributed_kernels(synthetic_trace())
    }
    assert kernels["reduce_kernel50"].startswith("norms")
    assert kernels["reshape_and_cache_kernel120"] == "attention: KV-cache write"
    assert kernels["paged_decode_kernel160"] == "attention: kernels"
    assert kernels["vectorized_elementwise_kernel320"] == "residual adds"
    assert kernels["argmax_kernel720"] == "sampling"
    # Graph kernels: launched from the replay phase; a GEMM is one by its name, the
    # others take the eager reference's categories.
    assert kernels["nvjet_gemm620"] == "GEMM (projections, LM head)"
    assert kernels["vectorized_elementwise_kernel640"] == "input upload / copies"


def test_graph_kernels_relabelled_in_order_and_busy_time_is_a_union(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": synthetic_trace()}))
    summary = analyse_trace(path)
    assert summary["wall_us"] == 1000
    # 20 + 10 + 100 + 10 + (620..680 = 60) + 10: no overlaps here
    assert summary["gpu_busy_us"] == 210
    assert summary["calls"]["cudaGraphLaunch"] == [1, 10]
    assert summary["calls"]["cudaStreamSynchronize"] == [1, 150]
    reference = [
        ("nvjet_gemm", "GEMM (projections, LM head)"),
        ("other", "norms (RMSNorm / LayerNorm)"),
    ]
    relabel_graph_kernels(summary, reference)
    graph = [k for k in summary["kernels"] if k["graph"]]
    assert [k["category"] for k in graph] == [
        "GEMM (projections, LM head)",
        "input upload / copies",
    ]
    assert summary["graph_kernels"] == 2 and summary["graph_kernels_matched"] == 1


def test_class_names_map_for_other_architectures():
    assert (
        category_of(["mod::LlamaMLP", "mod::LlamaDecoderLayer"], "silu")
        == "activation (SiLU-and-mul)"
    )
    assert category_of(["mod::RowParallelLinear", "mod::GPT2MLP"], "gemm").startswith("GEMM")
    assert category_of(["mod::LayerNorm", "mod::GPT2Block"], "k").startswith("norms")
    assert category_of(["mod::GemmaRotaryEmbedding"], "k").startswith("rotary (cos/sin")
    assert category_of(["mod::GPT2Attention"], "k").startswith("rotary + q/k/v")


def test_phases_are_exclusive():
    phases = Phases()
    phases.push("outer")
    phases.push("inner")
    phases.pop()
    phases.pop()
    assert set(phases.step) == {"outer", "inner"}
    assert all(v >= 0 for v in phases.step.values())


def test_compiled_and_replayed_kernels_are_named_by_what_they_fuse():
    # Inside a compiled block no module range marks a kernel: its name says what it is.
    layer = ["mod::LlamaDecoderLayer"]
    names = {
        "triton_red_fused__to_copy__unsafe_view_add_mean_mul_pow_rsqrt_3": "norms",
        "triton_poi_fused__unsafe_view_mul_silu_split_4": "activation",
        "triton_poi_fused__unsafe_view_add_cat_mul_neg_paged_attention_select_slice": "rotary +",
        "triton_poi_fused__unsafe_view_add_5": "residual adds",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT": "GEMM",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float>": "GEMM",
        "paged_prefill_kernel": "attention: kernels",
    }
    for name, category in names.items():
        assert category_of(layer, name).startswith(category), name
        assert category_of(["host::graph inputs + replay"], name).startswith(category), name
    # a kernel whose name says nothing keeps its module's share
    assert category_of(layer, "vectorized_elementwise_kernel") == "residual adds"
