"""Local nn.Linear subclasses: a plain linear map (Falcon's FalconLinear) shards like
nn.Linear and its class goes from the output; a scaled one stays local."""

from __future__ import annotations

import libcst as cst

from converter.passes import tidy
from converter.passes.tp.linear_subclasses import linear_subclasses
from tests.converter.test_pass_tp import SNIPPET, convert

SUBCLASSES = """
class UnfusedDense(nn.Linear):
    def forward(self, x):
        out = x @ self.weight.T
        if self.bias is None:
            return out
        return out + self.bias


class ViaFunctional(torch.nn.Linear):
    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class ScaledDense(nn.Linear):
    def forward(self, x):
        return (x @ self.weight.T) * 2


class WithInit(nn.Linear):
    def __init__(self, a, b):
        super().__init__(a, b)
        self.gain = nn.Parameter(torch.ones(b))
"""


def test_only_plain_linear_maps_qualify():
    found = linear_subclasses(cst.parse_module(SUBCLASSES))
    assert found == {"UnfusedDense", "ViaFunctional"}


def test_subclass_shards_like_linear_and_its_class_goes():
    source = SUBCLASSES + (
        SNIPPET.replace("self.wi = nn.Linear(", "self.wi = UnfusedDense(")
        .replace("self.wo = nn.Linear(", "self.wo = ViaFunctional(")
        .replace("self.project_out = nn.Linear(", "self.project_out = ScaledDense(")
    )
    code, ctx = convert(source)
    assert "self.wi = ColumnParallelLinear(config.hidden_size, 4 * config.hidden_size" in code
    assert "self.wo = RowParallelLinear(4 * config.hidden_size" in code
    assert ctx.tp_decisions["TinyMLP.wi"] == "colwise (dataflow)"
    # not a plain linear map: a local, replicated layer
    assert "self.project_out = ScaledDense(" in code
    module = tidy.run(cst.parse_module(code), ctx)
    names = {s.name.value for s in module.body if isinstance(s, cst.ClassDef)}
    assert names.isdisjoint({"UnfusedDense", "ViaFunctional"}) and "ScaledDense" in names
