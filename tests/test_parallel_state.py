"""Parallel state: single-process TP=1, helpers, and a gloo TP=2 group via run_distributed."""

import pytest
import torch
from distributed import run_distributed

from runtime.parallel import state
from runtime.parallel.state import (
    destroy_parallel,
    divide,
    get_tp_group,
    get_tp_rank,
    get_tp_size,
    init_parallel,
    local_head_block,
    local_num_heads,
    local_num_kv_heads,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)


def test_divide():
    assert divide(12, 4) == 3
    with pytest.raises(ValueError, match="not divisible"):
        divide(10, 4)


def test_single_process_needs_no_group():
    init_parallel(1)
    try:
        assert (get_tp_size(), get_tp_rank(), get_tp_group()) == (1, 0, None)
        x = torch.randn(3, 4)
        assert tensor_model_parallel_all_reduce(x) is x
        assert tensor_model_parallel_all_gather(x) is x
        assert local_num_heads(12) == 12 and local_num_kv_heads(4) == 4
    finally:
        destroy_parallel()


def test_multi_rank_without_rendezvous_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_parallel(2, rank=0)
    destroy_parallel()


@pytest.mark.parametrize(
    "tp,total_kv,expected",
    [(2, 8, 4), (4, 4, 1), (4, 2, 1), (8, 1, 1), (2, 3, None), (4, 3, None), (3, 2, None)],
)
def test_local_num_kv_heads(monkeypatch, tp, total_kv, expected):
    monkeypatch.setattr(state, "_TP_SIZE", tp)
    if expected is None:
        with pytest.raises(ValueError, match="key/value heads"):
            local_num_kv_heads(total_kv)
    else:
        assert local_num_kv_heads(total_kv) == expected


def test_local_num_heads_error(monkeypatch):
    monkeypatch.setattr(state, "_TP_SIZE", 4)
    assert local_num_heads(8) == 2
    with pytest.raises(ValueError, match="6 attention heads"):
        local_num_heads(6)


def test_unsharded_layers_keep_every_head(monkeypatch):
    """A layer whose plan gathered q/k/v for this config (sharded=False) runs all heads."""
    monkeypatch.setattr(state, "_TP_SIZE", 2)
    monkeypatch.setattr(state, "_TP_RANK", 1)
    assert local_num_heads(71, sharded=False) == 71 and local_num_heads(8, True) == 4
    assert local_num_kv_heads(3, sharded=False) == 3
    slopes = torch.arange(4.0)
    assert torch.equal(local_head_block(slopes), torch.tensor([2.0, 3.0]))
    assert torch.equal(local_head_block(slopes, sharded=False), slopes)
    assert local_head_block(None) is None


def _collectives(rank, world_size):
    assert get_tp_size() == world_size and get_tp_rank() == rank
    assert get_tp_group() is not None
    x = torch.full((2, 3), float(rank + 1))
    summed = tensor_model_parallel_all_reduce(x.clone())
    assert torch.equal(summed, torch.full((2, 3), float(sum(range(1, world_size + 1)))))
    gathered = tensor_model_parallel_all_gather(x, dim=-1)  # [2, 3 * world]
    expected = torch.cat([torch.full((2, 3), float(r + 1)) for r in range(world_size)], dim=-1)
    assert torch.equal(gathered, expected)
    gathered0 = tensor_model_parallel_all_gather(x, dim=0)  # [2 * world, 3]
    assert gathered0.shape == (2 * world_size, 3)
    return rank * 10


def _collectives_then_fail_on_rank_1(rank, world_size):
    _collectives(rank, world_size)  # an assertion failing here fails the test: no "boom"
    if rank == 1:
        raise KeyError("boom from rank 1")
    # Rank 0 waits in a collective that rank 1 never joins: the launcher must not hang.
    tensor_model_parallel_all_reduce(torch.ones(1))


def test_gloo_collectives_and_failure_propagation():
    # One spawn for both (spawning is slow); results are checked by the linear tests.
    with pytest.raises(RuntimeError, match="(?s)rank 1 of 2 failed.*KeyError.*boom from rank 1"):
        run_distributed(_collectives_then_fail_on_rank_1, 2, timeout=120)


_TORCHRUN_SCRIPT = """
import torch
from runtime.parallel import RowParallelLinear, destroy_parallel, get_tp_rank, init_parallel

init_parallel(2)  # RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT come from torchrun
torch.manual_seed(0)
w, b, x = torch.randn(8, 6), torch.randn(8), torch.randn(3, 6)
row = RowParallelLinear(6, 8, input_is_parallel=False)
row.weight.weight_loader(row.weight, w)
row.bias.weight_loader(row.bias, b)
assert torch.allclose(row(x), torch.nn.functional.linear(x, w, b), atol=1e-5)
print(f"rank {get_tp_rank()} ok")
destroy_parallel()
"""


@pytest.mark.slow
def test_init_parallel_under_torchrun(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from distributed import free_port

    script = tmp_path / "tp_script.py"
    script.write_text(_TORCHRUN_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(free_port()), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout
