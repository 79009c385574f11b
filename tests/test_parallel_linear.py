"""Parallel linear layers equal the unsharded nn.Linear with the same full weights.

TP=2 runs over gloo in two processes (one spawn for every check, spawning is slow);
TP=1 and the sharding arithmetic for larger TP sizes run in-process.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed

from runtime.parallel import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    state,
    tensor_model_parallel_all_reduce,
)

ATOL = 1e-5


def _load(layer, weight, bias=None, shard_id=None):
    layer.weight.weight_loader(layer.weight, weight, shard_id)
    if bias is not None:
        layer.bias.weight_loader(layer.bias, bias, shard_id)


def _column_and_row(rng, rank, tp):
    checks = 0
    for trial in range(3):
        n_in, n_out = rng.randint(1, 9) * tp, rng.randint(1, 9) * tp
        use_bias, transposed = trial != 1, trial == 2
        w, b, x = torch.randn(n_out, n_in), torch.randn(n_out), torch.randn(2, 3, n_in)
        ref = F.linear(x, w, b if use_bias else None)  # [2, 3, out]
        ckpt_w = w.t().contiguous() if transposed else w  # Conv1D stores [in, out]

        col = ColumnParallelLinear(n_in, n_out, bias=use_bias, transposed=transposed)
        _load(col, ckpt_w, b if use_bias else None)
        shard = n_out // tp
        torch.testing.assert_close(
            col(x), ref[..., rank * shard : (rank + 1) * shard], atol=ATOL, rtol=0
        )
        gathered = ColumnParallelLinear(
            n_in, n_out, bias=use_bias, gather_output=True, transposed=transposed
        )
        _load(gathered, ckpt_w, b if use_bias else None)
        out = gathered(x)
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)

        chunk = n_in // tp
        x_local = x[..., rank * chunk : (rank + 1) * chunk]  # [2, 3, in / tp]
        row = RowParallelLinear(n_in, n_out, bias=use_bias, transposed=transposed)
        _load(row, ckpt_w, b if use_bias else None)
        torch.testing.assert_close(row(x_local), ref, atol=ATOL, rtol=0)
        row_split = RowParallelLinear(
            n_in, n_out, bias=use_bias, input_is_parallel=False, transposed=transposed
        )
        _load(row_split, ckpt_w, b if use_bias else None)
        torch.testing.assert_close(row_split(x), ref, atol=ATOL, rtol=0)
        # Unreduced: the caller's own all-reduce must still see the bias exactly once.
        row_partial = RowParallelLinear(
            n_in, n_out, bias=use_bias, reduce_results=False, transposed=transposed
        )
        _load(row_partial, ckpt_w, b if use_bias else None)
        partial = row_partial(x_local)
        torch.testing.assert_close(
            tensor_model_parallel_all_reduce(partial), ref, atol=ATOL, rtol=0
        )
        checks += 5
    return checks


def _merged(rng, rank, tp):
    n_in = rng.randint(2, 9)
    sizes = [rng.randint(1, 5) * tp for _ in range(3)]
    ws = [torch.randn(s, n_in) for s in sizes]
    bs = [torch.randn(s) for s in sizes]
    x = torch.randn(5, n_in)
    outs = [F.linear(x, w, b) for w, b in zip(ws, bs)]  # each [5, size]
    # Rank r holds [gate_r | up_r | ...]: its shard of each projection, in order.
    expected = torch.cat([o.chunk(tp, dim=-1)[rank] for o in outs], dim=-1)
    by_id = MergedColumnParallelLinear(n_in, sizes, bias=True)
    for i, (w, b) in enumerate(zip(ws, bs)):
        _load(by_id, w, b, shard_id=i)
    torch.testing.assert_close(by_id(x), expected, atol=ATOL, rtol=0)
    fused = MergedColumnParallelLinear(n_in, sizes, bias=True)  # Phi-3 gate_up_proj style
    _load(fused, torch.cat(ws), torch.cat(bs), shard_id=None)
    torch.testing.assert_close(fused(x), expected, atol=ATOL, rtol=0)
    gathered = MergedColumnParallelLinear(n_in, sizes, bias=False, gather_output=True)
    _load(gathered, torch.cat(ws))
    # Gathered, it is the unsharded [gate | up] that the replaced nn.Linear produced.
    torch.testing.assert_close(gathered(x), F.linear(x, torch.cat(ws)), atol=ATOL, rtol=0)
    return 3


def _expected_qkv(x, wq, wk, wv, bq, bk, bv, head, n_kv, rank, tp):
    """This rank's q, k, v computed from the full projections, head by head."""
    q = F.linear(x, wq, bq).unflatten(-1, (-1, head))  # [T, H, D]
    k = F.linear(x, wk, bk).unflatten(-1, (-1, head))  # [T, KV, D]
    v = F.linear(x, wv, bv).unflatten(-1, (-1, head))
    n_q = q.shape[1] // tp
    kv_local = max(1, n_kv // tp)
    # A rank must hold exactly the KV heads its query heads attend to (GQA: query head h
    # reads KV head h // group); with tp > n_kv that one KV head is shared by several ranks.
    kv_first = (rank * n_q) // (q.shape[1] // n_kv)
    q_r = q[:, rank * n_q : (rank + 1) * n_q].flatten(1)
    k_r = k[:, kv_first : kv_first + kv_local].flatten(1)
    v_r = v[:, kv_first : kv_first + kv_local].flatten(1)
    return q_r, k_r, v_r


def _qkv(rng, rank, tp, layouts):
    checks = 0
    for n_heads, n_kv in layouts:
        head, hidden = rng.choice([2, 4, 8]), rng.randint(2, 12)
        wq, wk, wv = (
            torch.randn(n_heads * head, hidden),
            torch.randn(n_kv * head, hidden),
            torch.randn(n_kv * head, hidden),
        )
        bq, bk, bv = torch.randn(n_heads * head), torch.randn(n_kv * head), torch.randn(n_kv * head)
        x = torch.randn(4, hidden)
        expected = _expected_qkv(x, wq, wk, wv, bq, bk, bv, head, n_kv, rank, tp)
        fused_w, fused_b = torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv])
        for mode in ("ids", "fused", "fused_transposed"):
            layer = QKVParallelLinear(
                hidden, head, n_heads, n_kv, bias=True, transposed=mode == "fused_transposed"
            )
            if mode == "ids":
                for sid, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
                    _load(layer, w, b, sid)
            elif mode == "fused":  # Phi-3 qkv_proj
                _load(layer, fused_w, fused_b)
            else:  # GPT-2 c_attn: Conv1D weight [in, 3 * hidden]
                _load(layer, fused_w.t().contiguous(), fused_b)
            assert layer.num_kv_heads == max(1, n_kv // tp)
            got = layer(x).split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
            checks += 1
    return checks


def _errors(tp):
    col = ColumnParallelLinear(8, 4 * tp)
    with pytest.raises(ValueError, match=r"shape \(3, 8\), expected \(" + str(4 * tp) + r", 8\)"):
        col.weight.weight_loader(col.weight, torch.randn(3, 8))
    with pytest.raises(ValueError, match="takes no shard id"):
        col.weight.weight_loader(col.weight, torch.randn(4 * tp, 8), 0)
    qkv = QKVParallelLinear(8, 2, 2 * tp, tp)
    with pytest.raises(ValueError, match="shard id must be one of"):
        qkv.weight.weight_loader(qkv.weight, torch.randn(4 * tp, 8), "o")
    with pytest.raises(ValueError, match=r"expected \(" + str(2 * tp) + r", 8\)"):
        qkv.weight.weight_loader(qkv.weight, torch.randn(4 * tp, 8), "k")
    if tp == 1:
        return 4
    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelLinear(8, 2 * tp + 1)
    with pytest.raises(ValueError, match="key/value heads"):
        QKVParallelLinear(8, 2, 6 * tp, 3 * tp + 1)
    return 6


def _all_linear_checks(rank, world_size, seed):
    torch.manual_seed(seed)  # same seed on every rank: identical "checkpoint" tensors
    rng = random.Random(seed)
    layouts = [(4, 4), (4, 2), (6, 2), (4, 1), (2, 1)]  # the last two replicate KV heads
    return (
        _column_and_row(rng, rank, world_size)
        + _merged(rng, rank, world_size)
        + _qkv(rng, rank, world_size, layouts)
        + _errors(world_size)
    )


def test_linear_layers_tp2_match_unsharded():
    counts = run_distributed(_all_linear_checks, 2, 1234)
    assert counts == [15 + 3 + 15 + 6] * 2


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_layers_tp1_match_unsharded(seed):
    assert state.get_tp_size() == 1
    assert _all_linear_checks(0, 1, seed) == 15 + 3 + 15 + 4


@pytest.mark.parametrize("tp,n_heads,n_kv", [(4, 8, 2), (8, 8, 2), (4, 4, 4), (4, 8, 1)])
def test_qkv_sharding_for_larger_tp(monkeypatch, tp, n_heads, n_kv):
    """Column layers need no collective without gather_output, so a rank's view of any
    TP size can be built in-process; this covers 2 and 4 ranks sharing one KV head."""
    monkeypatch.setattr(state, "_TP_SIZE", tp)
    torch.manual_seed(tp + n_kv)
    for rank in range(tp):
        monkeypatch.setattr(state, "_TP_RANK", rank)
        assert _qkv(random.Random(rank), rank, tp, [(n_heads, n_kv)]) == 3


def test_params_follow_default_device_and_dtype_and_keep_loaders():
    with torch.device("meta"):
        layer = QKVParallelLinear(8, 2, 4, 2, params_dtype=torch.bfloat16)
    assert layer.weight.device.type == "meta" and layer.weight.dtype == torch.bfloat16
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        row = RowParallelLinear(4, 6)
    finally:
        torch.set_default_dtype(old)
    assert row.weight.dtype == torch.float64 and not row.weight.requires_grad
    # The engine may cast after building: the loaders must survive Module.to().
    row = row.to(torch.float16)
    w, b = torch.randn(6, 4), torch.randn(6)
    row.weight.weight_loader(row.weight, w)
    row.bias.weight_loader(row.bias, b)
    assert row.weight.dtype == torch.float16
    torch.testing.assert_close(row.weight, w.half(), atol=0, rtol=0)


def test_default_weight_loader():
    from runtime.parallel import default_weight_loader

    p = torch.nn.Parameter(torch.empty(3, 2), requires_grad=False)
    w = torch.randn(3, 2)
    default_weight_loader(p, w)
    assert torch.equal(p, w)
    with pytest.raises(
        ValueError, match=r"shape mismatch: parameter \(3, 2\) vs checkpoint \(2, 3\)"
    ):
        default_weight_loader(p, torch.randn(2, 3))
    with pytest.raises(
        ValueError, match=r"shape mismatch: parameter \(3, 2\) vs checkpoint \(2,\)"
    ):
        default_weight_loader(p, torch.randn(2))  # copy_ would have broadcast this
    scalar = torch.nn.Parameter(torch.empty(1), requires_grad=False)
    default_weight_loader(scalar, torch.tensor(2.5))
    assert scalar.item() == 2.5
