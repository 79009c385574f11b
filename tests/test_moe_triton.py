"""The fused-MoE Triton kernels (interpreter on CPU) against the torch reference and the
per-expert loop: the alignment's invariants, every layout flag and dtype, experts with no
token, expert-parallel maps, and every block size the configs can pick."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_cases import DTYPES, HFWeights, Spec, assert_matches, routing, specs

from runtime.moe.partition import ExpertPartition
from runtime.moe.reference import fused_experts_ref
from runtime.moe.triton_align import max_padded_blocks, moe_align_block_size
from runtime.moe.triton_config import MoEConfig, TileConfig, default_moe_config
from runtime.moe.triton_ops import fused_experts

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_alignment(index: torch.Tensor, num_local: int, block_m: int, expert_map=None):
    align = moe_align_block_size(index.to(DEVICE), num_local, block_m, expert_map)
    ids = index.flatten()
    local = ids if expert_map is None else expert_map.cpu()[ids].long()
    num_pairs = ids.numel()
    counts = torch.bincount(local[local >= 0], minlength=num_local)
    padded = ((counts + block_m - 1) // block_m * block_m).tolist()
    total = int(align.num_padded)
    assert total == sum(padded)
    assert align.max_blocks >= total // block_m
    sorted_ids = align.sorted_ids.cpu()[:total]
    blocks = align.block_expert.cpu()
    start = 0
    for e, size in enumerate(padded):  # runs in expert order, each padded with the sentinel
        run = sorted_ids[start : start + size]
        real = run[run < num_pairs].long()
        assert real.tolist() == (local == e).nonzero().flatten().tolist()  # all, in order
        assert (run[len(real) :] == num_pairs).all()
        assert (blocks[start // block_m : (start + size) // block_m] == e).all()
        start += size
    assert (blocks[total // block_m :] == -1).all()


@settings(max_examples=25, deadline=None)
@given(
    num_tokens=st.integers(0, 700),
    num_experts=st.integers(1, 256),
    top_k=st.integers(1, 8),
    block_m=st.sampled_from([16, 32, 64, 128]),
    expert_parallel=st.sampled_from([None, (2, 0), (2, 1), (3, 2)]),
    seed=st.integers(0, 1000),
)
def test_alignment_sorts_every_pair_into_padded_expert_runs(
    num_tokens, num_experts, top_k, block_m, expert_parallel, seed
):
    top_k = min(top_k, num_experts)
    index, _ = routing(num_tokens, num_experts, top_k, seed, busy_experts=seed % 7 or None)
    expert_map, num_local = None, num_experts
    if expert_parallel and num_experts >= expert_parallel[0]:
        size, rank = expert_parallel
        base, extra = divmod(num_experts, size)
        start = rank * base + min(rank, extra)
        num_local = base + (rank < extra)
        partition = ExpertPartition(num_experts, 4, True, start, num_local, 0, 4)
        expert_map = partition.expert_map().to(DEVICE)
    check_alignment(index, num_local, block_m, expert_map)


def test_padding_bound_is_tight():
    # Every expert gets one pair: each wastes block_m - 1 slots, the bound exactly.
    index = torch.arange(8).view(8, 1)
    assert max_padded_blocks(8, 8, 16) == 8
    check_alignment(index, 8, 16)


def run_both(spec, dtype, num_tokens, top_k, seed, busy=None, config=None, partition=None):
    weights = HFWeights.random(spec, dtype, seed)
    layer = spec.layer(dtype)
    weights.load_into(layer)
    index, route_w = routing(num_tokens, spec.num_experts, top_k, seed, busy)
    x = torch.randn(num_tokens, spec.hidden, generator=torch.Generator().manual_seed(seed))
    x = x.to(dtype)
    w_in = getattr(layer, spec.in_name)
    kwargs = dict(
        b_in=getattr(layer, spec.in_name + "_bias") if spec.has_bias else None,
        b_down=layer.down_proj_bias if spec.has_bias else None,
        apply_router_weight_on_input=spec.apply_router_weight_on_input,
    )
    ref = fused_experts_ref(x, w_in, layer.down_proj, index, route_w, layer.activation, **kwargs)
    moved = {
        k: v.to(DEVICE) if v is not None else None
        for k, v in kwargs.items()
        if k != "apply_router_weight_on_input"
    }
    out = fused_experts(
        x.to(DEVICE), w_in.to(DEVICE), layer.down_proj.to(DEVICE), index.to(DEVICE),
        route_w.to(DEVICE), layer.activation, config=config,
        apply_router_weight_on_input=spec.apply_router_weight_on_input, **moved,
    ).cpu()  # fmt: skip
    assert out.dtype == dtype
    return out, ref, weights.oracle(x, index, route_w)


@settings(max_examples=12, deadline=None)
@given(
    spec=specs(hidden=(16, 40), inter=(16, 24)),
    num_tokens=st.integers(1, 32),
    top_k=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    idle=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference_and_loop(spec, num_tokens, top_k, dtype, idle, seed):
    top_k = min(top_k, spec.num_experts)
    busy = max(1, spec.num_experts // 4) if idle else None
    out, ref, oracle = run_both(spec, dtype, num_tokens, top_k, seed, busy)
    assert_matches(out, oracle, dtype)
    assert_matches(out, ref.float(), dtype)


CONFIGS = [
    MoEConfig(16, TileConfig(16, 16), TileConfig(32, 16)),
    MoEConfig(32, TileConfig(32, 64, group_m=4), TileConfig(16, 32, group_m=2)),
    MoEConfig(64, TileConfig(64, 32, group_m=8), TileConfig(64, 64, group_m=8)),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"bm{c.block_m}")
def test_every_tile_shape_multi_chunk_alignment(config):
    # 160 tokens x top-4 = 640 pairs: the three-pass alignment; K = 40 is not a multiple
    # of BLOCK_K, N = 24 not a multiple of BLOCK_N; gpt-oss's layout.
    spec = Spec(
        6, 40, 24, is_concatenated=False, is_transposed=True, has_bias=True,
        alpha=1.702, limit=7.0, up_offset=1.0,
    )  # fmt: skip
    out, ref, oracle = run_both(spec, torch.float32, 160, 4, seed=3, busy=4, config=config)
    assert_matches(out, oracle, torch.float32)


def test_expert_parallel_map_skips_other_ranks_pairs():
    spec = Spec(8, 16, 16, has_bias=True)
    weights = HFWeights.random(spec, torch.float32)
    index, route_w = routing(50, 8, 3, seed=5)
    x = torch.randn(50, 16)
    partition = ExpertPartition(8, 16, True, 3, 3, 0, 16)  # experts 3, 4, 5 here
    layer = spec.layer()
    weights.load_into(layer)
    local = slice(3, 6)
    args = (getattr(layer, spec.in_name)[local], layer.down_proj[local], index, route_w)
    kwargs = dict(
        b_in=layer.gate_up_proj_bias[local], b_down=layer.down_proj_bias[local],
        expert_map=partition.expert_map(),
    )  # fmt: skip
    ref = fused_experts_ref(x, *args, layer.activation, **kwargs)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    out = fused_experts(
        dev(x), *map(dev, args), layer.activation, **{k: dev(v) for k, v in kwargs.items()}
    ).cpu()
    oracle = weights.oracle(x, index, route_w, expert_subset=range(3, 6))
    assert_matches(ref, oracle, torch.float32)
    assert_matches(out, oracle, torch.float32)


def test_module_triton_backend(monkeypatch):
    spec = Spec(16, 32, 16, activation="gelu")
    layer = spec.layer().to(DEVICE)
    HFWeights.random(spec, torch.float32).load_into(layer)
    index, route_w = routing(9, 16, 4, seed=0)
    x = torch.randn(9, 32, device=DEVICE)
    monkeypatch.setenv("HF2PAGED_MOE_BACKEND", "torch")
    ref = layer(x, index.to(DEVICE), route_w.to(DEVICE))
    monkeypatch.setenv("HF2PAGED_MOE_BACKEND", "triton")
    out = layer(x, index.to(DEVICE), route_w.to(DEVICE))
    assert_matches(out.cpu(), ref.cpu(), torch.float32)


def test_default_configs_by_regime_and_shared_memory(monkeypatch):
    from runtime.moe import triton_config

    gpu = torch.device("cuda")  # the heuristics read only the limits patched below
    monkeypatch.setattr(triton_config, "device_limits", lambda device: (227 * 1024, 132))
    decode = default_moe_config(8, 8, 128, 2048, 768, torch.bfloat16, gpu)
    prefill = default_moe_config(8192, 8, 128, 2048, 768, torch.bfloat16, gpu)
    assert decode.block_m == 16 and decode.gate_up.num_stages == 4
    assert prefill.block_m == 128 and prefill.gate_up.block_n == 128
    assert default_moe_config(64, 8, 128, 2048, 768, torch.bfloat16, gpu).block_m == 16
    assert default_moe_config(1024, 8, 128, 2048, 768, torch.bfloat16, gpu).block_m == 64
    # one token, 8 experts: narrower N tiles until the grid covers the 132 SMs
    one = default_moe_config(1, 8, 128, 2048, 768, torch.bfloat16, gpu)
    assert decode.gate_up.block_n == 64 and one.gate_up.block_n == 32
    # a device with less shared memory gets fewer stages, then smaller tiles
    monkeypatch.setattr(triton_config, "device_limits", lambda device: (64 * 1024, 108))
    small = default_moe_config(8192, 8, 128, 2048, 768, torch.bfloat16, gpu)
    for tile, weight_tiles in ((small.gate_up, 2), (small.down, 1)):
        per_stage = (128 * tile.block_k + weight_tiles * tile.block_k * tile.block_n) * 2
        assert tile.num_stages * per_stage + 2048 <= 64 * 1024


def test_cpu_default_config_is_small():
    config = default_moe_config(512, 8, 128, 2048, 768, torch.bfloat16, torch.device("cpu"))
    assert config.block_m == 16 and config.gate_up.block_n <= 32


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(
    spec=specs(hidden=(16, 40, 64), inter=(16, 24, 48)),
    num_tokens=st.integers(1, 512),
    top_k=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    config=st.sampled_from([None, *CONFIGS]),
    seed=st.integers(0, 2**16),
)
def test_triton_sweep_slow(spec, num_tokens, top_k, dtype, config, seed):
    top_k = min(top_k, spec.num_experts)
    out, ref, oracle = run_both(spec, dtype, num_tokens, top_k, seed, config=config)
    assert_matches(out, oracle, dtype)


if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
