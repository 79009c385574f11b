"""The benchmarks' and tests' batch mover takes every tensor of a batch to the device,
including the mixed-batch ids a CPU reference run may already have cached in its metadata
(the GPU sweep failed on every mixed batch when it did not)."""

from __future__ import annotations

import torch
from attention_cases import make_batch, to_device


def test_to_device_moves_every_tensor_of_a_mixed_batch() -> None:
    batch = make_batch([(0, 5), (7, 1), (3, 1)], num_heads=4, num_kv_heads=2, head_dim=8,
                       block_size=4, dtype=torch.float32)  # fmt: skip
    batch.metadata.mixed_split()  # what the reference or a first layer leaves behind
    moved = to_device(batch, torch.device("meta"))
    md = moved.metadata
    tensors = [getattr(md, f) for f in md.__dataclass_fields__] + list(vars(moved).values())
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    assert md.decode_ids is not None and len(tensors) >= 10
    assert all(t.device.type == "meta" for t in tensors)
    assert batch.metadata.decode_ids.device.type == "cpu"  # the CPU copies stay
