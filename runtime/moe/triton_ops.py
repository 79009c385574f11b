"""Triton backend of `FusedMoE`: `fused_experts`, with exactly the semantics of
`runtime.moe.reference.fused_experts_ref`.

One call is five launches: the alignment (one program for decode-sized batches, three
passes otherwise; `triton_align`), the gate/up GEMM with the activation in its epilogue,
the down GEMM with the routing weight in its epilogue, and the fp32 top-k sum
(`triton_gemm`). Nothing reads the routing on the host, so the call can be captured in a
CUDA graph: the grids depend on the batch size only.
"""

from __future__ import annotations

import torch
import triton

from runtime.attention.triton_common import dot_precision
from runtime.moe.activation import ExpertActivation
from runtime.moe.triton_align import moe_align_block_size
from runtime.moe.triton_config import MoEConfig, default_moe_config
from runtime.moe.triton_gemm import _down_kernel, _gate_up_kernel, _sum_kernel

__all__ = ["fused_experts"]


def fused_experts(
    hidden_states: torch.Tensor,  # [T, H]
    w_in: torch.Tensor,  # [E_local, 2I or I, H] gate_up (or up) in the held layout
    w_down: torch.Tensor,  # [E_local, H, I]
    top_k_index: torch.Tensor,  # [T, k] global expert ids
    top_k_weights: torch.Tensor,  # [T, k]
    activation: ExpertActivation,
    *,
    b_in: torch.Tensor | None = None,  # [E_local, 2I or I]
    b_down: torch.Tensor | None = None,  # [E_local, H]
    expert_map: torch.Tensor | None = None,  # [E_global] int32 global -> local, -1 elsewhere
    apply_router_weight_on_input: bool = False,
    config: MoEConfig | None = None,
) -> torch.Tensor:  # [T, H] in hidden_states' dtype
    num_tokens, hidden = hidden_states.shape
    num_experts, in_rows, _ = w_in.shape
    inter = w_down.shape[2]
    top_k = top_k_index.shape[1]
    gated = activation.has_gate
    assert in_rows == (2 * inter if gated else inter), (tuple(w_in.shape), tuple(w_down.shape))
    assert w_in.shape[2] == hidden and tuple(w_down.shape[:2]) == (num_experts, hidden)
    assert top_k_index.shape == top_k_weights.shape and top_k_index.shape[0] == num_tokens
    assert not top_k_index.is_floating_point() and top_k_weights.is_floating_point()
    assert w_in.dtype == w_down.dtype and hidden_states.dtype.is_floating_point
    assert w_in.stride(2) == 1 and w_down.stride(2) == 1, "weights must be contiguous in K"
    for b, rows in ((b_in, in_rows), (b_down, hidden)):
        assert b is None or (tuple(b.shape) == (num_experts, rows) and b.stride(1) == 1)
    assert expert_map is None or expert_map.dtype == torch.int32
    device = hidden_states.device
    out = hidden_states.new_empty(num_tokens, hidden)
    if num_tokens == 0:
        return out
    if hidden_states.stride(1) != 1:
        hidden_states = hidden_states.contiguous()
    if hidden_states.dtype != w_in.dtype:
        hidden_states = hidden_states.to(w_in.dtype)  # the weights' precision, as F.linear
    pair_weights = top_k_weights.contiguous().view(-1)  # [S]
    ids = top_k_index.contiguous()  # [T, k]
    if config is None:
        config = default_moe_config(
            num_tokens, top_k, num_experts, hidden, inter, w_in.dtype, device
        )
    align = moe_align_block_size(ids, num_experts, config.block_m, expert_map)
    num_pairs = num_tokens * top_k
    dot_prec = dot_precision(w_in.dtype, device)
    h = hidden_states.new_empty(num_pairs, inter)  # [S, I]
    y = hidden_states.new_empty(num_pairs, hidden)  # [S, H]
    act, dummy = activation, pair_weights

    tile = config.gate_up
    grid = (align.max_blocks * triton.cdiv(inter, tile.block_n),)
    _gate_up_kernel[grid](
        hidden_states, w_in, dummy if b_in is None else b_in, h, pair_weights,
        align.sorted_ids, align.block_expert, align.num_padded,
        num_pairs, align.max_blocks, inter, hidden,
        hidden_states.stride(0), w_in.stride(0), w_in.stride(1),
        0 if b_in is None else b_in.stride(0), h.stride(0),
        act.alpha, act.limit or 0.0, act.up_offset,
        TOP_K=top_k, ACT=act.kernel_id, HAS_GATE=gated, HAS_BIAS=b_in is not None,
        HAS_LIMIT=gated and act.limit is not None, LIMIT_AFTER_ACT=act.limit_after_activation,
        WEIGHT_INPUT=apply_router_weight_on_input, EVEN_K=hidden % tile.block_k == 0,
        DOT_PREC=dot_prec, BLOCK_M=config.block_m, BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip

    tile = config.down
    grid = (align.max_blocks * triton.cdiv(hidden, tile.block_n),)
    _down_kernel[grid](
        h, w_down, dummy if b_down is None else b_down, y, pair_weights,
        align.sorted_ids, align.block_expert, align.num_padded,
        num_pairs, align.max_blocks, hidden, inter,
        h.stride(0), w_down.stride(0), w_down.stride(1),
        0 if b_down is None else b_down.stride(0), y.stride(0),
        HAS_BIAS=b_down is not None, WEIGHT_OUTPUT=not apply_router_weight_on_input,
        EVEN_K=inter % tile.block_k == 0, DOT_PREC=dot_prec,
        BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        GROUP_M=tile.group_m, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip

    block_h = min(1024, triton.next_power_of_2(hidden))
    _sum_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, out, ids, ids if expert_map is None else expert_map, hidden,
        y.stride(0), out.stride(0),
        TOP_K=top_k, HAS_MAP=expert_map is not None, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    return out
