"""load_checkpoint and buffers: persistent ones (a router's e_score_correction_bias) are
checkpoint state and load strictly; non-persistent ones (rotary inv_freq) are skipped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from runtime.checkpoint import load_checkpoint, persistent_buffers


class Router(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 3))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(4))
        self.inv_freq = nn.Buffer(torch.ones(2), persistent=False)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Router()
        self.shared = self.gate  # the same module twice: its buffer is listed once


def test_persistent_buffers_load_and_are_required():
    model = Model()
    assert list(persistent_buffers(model)) == ["gate.e_score_correction_bias"]
    bias, weight = torch.randn(4), torch.randn(4, 3)
    loaded = load_checkpoint(
        model,
        [
            ("gate.weight", weight),
            ("gate.e_score_correction_bias", bias),
            ("gate.inv_freq", torch.zeros(2)),  # recomputed by the module: skipped
        ],
    )
    assert loaded == {"gate.weight", "gate.e_score_correction_bias"}
    assert torch.equal(model.gate.e_score_correction_bias, bias)
    assert torch.equal(model.gate.inv_freq, torch.ones(2))
    with pytest.raises(ValueError, match=r"gate.e_score_correction_bias \(a persistent buffer\)"):
        load_checkpoint(Model(), [("gate.weight", weight)])


def test_a_buffer_of_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match="gate.e_score_correction_bias.*shape \\(5,\\)"):
        load_checkpoint(
            Model(),
            [("gate.weight", torch.zeros(4, 3)), ("gate.e_score_correction_bias", torch.zeros(5))],
        )
