"""The fused-MoE grouped GEMMs and the top-k sum.

Both GEMMs walk the expert-sorted pair list of `runtime.moe.triton_align`: a program owns
BLOCK_M consecutive entries (pairs routed to one expert, padded with a sentinel) and a
BLOCK_N slice of output features, and reads only that expert's weights.

    _gate_up_kernel   x [T, H] -> h [S, I]   h[s] = gate(act)(x[s // k] @ W_in[e]^T + b_in[e])
                      gate and up are two accumulators of one program (rows n and I + n of
                      W_in), the activation runs in the epilogue, so the [S, 2I] product
                      never reaches memory
    _down_kernel      h [S, I] -> y [S, H]   y[s] = (h[s] @ W_down[e]^T + b_down[e]) * w[s]
    _sum_kernel       y [S, H] -> out [T, H] out[t] = sum_j y[t * k + j] in fp32, skipping
                      pairs routed to another rank's experts

(s = t * k + j is a pair: token t's j-th routed expert; e its local expert.) Rows are
addressed by pair id, not by sorted position, so the padding costs no memory. fp32 weights
take exact ("ieee") dots; 16-bit weights run the tensor cores with fp32 accumulation.
"""

from __future__ import annotations

import triton
import triton.language as tl

from runtime.attention.triton_common import _tanh, mma

SQRT_HALF = tl.constexpr(0.7071067811865476)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _tile_ids(max_blocks, n_size, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              GROUP_M: tl.constexpr):  # fmt: skip
    """(row block, column block) of this program over the launch grid (``max_blocks`` row
    blocks, the bound the host sized it by): GROUP_M row blocks share each column block in
    turn, so consecutive programs reuse weight tiles from L2."""
    pid = tl.program_id(0)
    blocks_m = max_blocks
    blocks_n = tl.cdiv(n_size, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _activation(x, ACT: tl.constexpr, alpha):
    """runtime.moe.activation.KERNEL_ACTIVATIONS[ACT] of fp32 x."""
    if ACT == 0:  # silu, x * sigmoid(alpha * x)
        return x / (1.0 + tl.exp(-alpha * x))
    elif ACT == 1:  # gelu (erf)
        return 0.5 * x * (1.0 + tl.math.erf(x * SQRT_HALF))
    elif ACT == 2:  # gelu, tanh approximation
        return 0.5 * x * (1.0 + _tanh((x + 0.044715 * x * x * x) * SQRT_2_OVER_PI))
    elif ACT == 3:  # relu
        return tl.maximum(x, 0.0)
    elif ACT == 4:  # relu squared
        r = tl.maximum(x, 0.0)
        return r * r
    else:  # sigmoid
        return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, H]
    w_ptr,  # [E, 2I, H] (gate rows [0, I), up rows [I, 2I)) or [E, I, H] without a gate
    b_ptr,  # [E, 2I] / [E, I] (read if HAS_BIAS)
    h_ptr,  # [S, I] out
    pair_w_ptr,  # [S] routing weights (read if WEIGHT_INPUT)
    sorted_ptr,  # [padded] int32 pair ids
    block_expert_ptr,  # [blocks] int32
    num_padded_ptr,  # [1] int32
    num_pairs, max_blocks, n_size, k_size,  # S, launched row blocks, I, H
    stride_xt, stride_we, stride_wn, stride_be, stride_hs,
    alpha, limit, up_offset,
    TOP_K: tl.constexpr, ACT: tl.constexpr, HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, LIMIT_AFTER_ACT: tl.constexpr, WEIGHT_INPUT: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    num_padded = tl.load(num_padded_ptr)
    pid_m, pid_n = _tile_ids(max_blocks, n_size, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= num_padded:
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    row_mask = pairs < num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_size
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    # Out-of-range columns wrap onto real rows (loads stay unmasked); their results are
    # never stored.
    w_rows = (offs_n % n_size).to(tl.int64) * stride_wn
    wu_ptrs = w_ptr + expert * stride_we + w_rows[None, :] + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    if HAS_GATE:
        wg_ptrs = wu_ptrs
        wu_ptrs += n_size * stride_wn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_size, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            wu = tl.load(wu_ptrs)
        else:
            k_mask = offs_k < k_size - k * BLOCK_K
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=k_mask[:, None], other=0.0)
        acc_u += mma(x, wu, DOT_PREC)
        if HAS_GATE:
            if EVEN_K:
                wg = tl.load(wg_ptrs)
            else:
                wg = tl.load(wg_ptrs, mask=k_mask[:, None], other=0.0)
            acc_g += mma(x, wg, DOT_PREC)
            wg_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    # Epilogue, fp32: router weight on the input (linear, so it scales the products),
    # bias, activation, gate * up.
    if WEIGHT_INPUT:
        pair_w = tl.load(pair_w_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)
        acc_u *= pair_w[:, None]
        if HAS_GATE:
            acc_g *= pair_w[:, None]
    if HAS_BIAS:
        b_ptrs = b_ptr + expert * stride_be + offs_n
        acc_u += tl.load(b_ptrs + (n_size if HAS_GATE else 0), mask=n_mask).to(tl.float32)[None, :]
        if HAS_GATE:
            acc_g += tl.load(b_ptrs, mask=n_mask).to(tl.float32)[None, :]
    if HAS_GATE:
        if HAS_LIMIT and not LIMIT_AFTER_ACT:
            acc_g = tl.minimum(acc_g, limit)
        h = _activation(acc_g, ACT, alpha)
        if HAS_LIMIT:
            if LIMIT_AFTER_ACT:
                h = tl.minimum(h, limit)
            acc_u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        h = h * (acc_u + up_offset)
    else:
        h = _activation(acc_u, ACT, alpha)
    h_ptrs = h_ptr + pairs.to(tl.int64)[:, None] * stride_hs + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    h_ptr,  # [S, I]
    w_ptr,  # [E, H, I]
    b_ptr,  # [E, H] (read if HAS_BIAS)
    y_ptr,  # [S, H] out
    pair_w_ptr,  # [S] routing weights (read if WEIGHT_OUTPUT)
    sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, max_blocks, n_size, k_size,  # S, launched row blocks, H, I
    stride_hs, stride_we, stride_wn, stride_be, stride_ys,
    HAS_BIAS: tl.constexpr, WEIGHT_OUTPUT: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    num_padded = tl.load(num_padded_ptr)
    pid_m, pid_n = _tile_ids(max_blocks, n_size, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= num_padded:
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    row_mask = pairs < num_pairs
    rows = pairs.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_size
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_hs + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_rows = (offs_n % n_size).to(tl.int64) * stride_wn
    w_ptrs = w_ptr + expert * stride_we + w_rows[None, :] + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_size, BLOCK_K)):
        if EVEN_K:
            h = tl.load(h_ptrs, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_ptrs)
        else:
            k_mask = offs_k < k_size - k * BLOCK_K
            h = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc += mma(h, w, DOT_PREC)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + offs_n, mask=n_mask).to(tl.float32)[None, :]
    if WEIGHT_OUTPUT:
        pair_w = tl.load(pair_w_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)
        acc *= pair_w[:, None]
    y_ptrs = y_ptr + rows[:, None] * stride_ys + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _sum_kernel(
    y_ptr,  # [S, H]
    out_ptr,  # [T, H]
    ids_ptr,  # [S] global expert ids (read if HAS_MAP)
    map_ptr,  # [E_global] int32 global -> local, -1 elsewhere (read if HAS_MAP)
    hidden,
    stride_ys, stride_ot,
    TOP_K: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """One program per (token, BLOCK_H features): the fp32 sum of the token's pairs."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < hidden
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        row = tl.load(y_ptr + pair * stride_ys + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_MAP:  # a pair of another rank's expert: its row was never written
            local = tl.load(map_ptr + tl.load(ids_ptr + pair))
            row = tl.where(local >= 0, row, 0.0)
        acc += row
    tl.store(out_ptr + token * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
