"""Column- and row-parallel linear layers: drop-in replacements for `nn.Linear`.

`forward(x)` returns one Tensor and the parameters keep nn.Linear's names and layout
(`weight` [out, in], `bias` [out]), so HF modeling code stays verbatim around them.
`in_features` / `out_features` are this rank's sizes (the shapes the code will see).

GPT-2-style `Conv1D` checkpoints store the weight as [in, out]: pass `transposed=True`
and the weight_loader transposes the checkpoint tensor before sharding. The parameter
itself is always [out, in] and forward is always `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.parallel.state import (
    divide,
    get_tp_rank,
    get_tp_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from runtime.parallel.weights import check_loaded_shape, copy_checked, make_param


class LinearBase(nn.Module):
    """Shared parameter creation: `weight` [out_local, in_local], optional `bias`.

    Subclasses define `weight_loader(param, loaded_weight, shard_id=None)`, which is
    attached to every parameter as `param.weight_loader`.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        out_local: int,
        in_local: int,
        bias: bool,
        bias_local: int,
        params_dtype: torch.dtype | None,
        transposed: bool,
    ):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp_size = get_tp_size()
        self.tp_rank = get_tp_rank()
        self.transposed = transposed
        self.in_features = in_local
        self.out_features = out_local
        self.weight = make_param(out_local, in_local, dtype=params_dtype)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = make_param(bias_local, dtype=params_dtype)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _as_out_in(self, param: nn.Parameter, loaded: torch.Tensor) -> torch.Tensor:
        """The checkpoint weight in [out, in] layout (Conv1D stores [in, out])."""
        if self.transposed and param.dim() == 2:
            return loaded.t()  # [out, in]
        return loaded

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, tp_size={self.tp_size}"
            + (", transposed=True" if self.transposed else "")
        )


class ColumnParallelLinear(LinearBase):
    """Y = X W^T + b with W split along the output dimension (dim 0) over TP ranks.

    Each rank computes `output_size / tp` output features; `gather_output=True`
    all-gathers them into the full `[..., output_size]`.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = False,
        params_dtype: torch.dtype | None = None,
        transposed: bool = False,
    ):
        out_local = divide(output_size, get_tp_size())
        super().__init__(
            input_size,
            output_size,
            out_local,
            input_size,
            bias,
            out_local,
            params_dtype,
            transposed,
        )
        self.gather_output = gather_output

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard id, got {shard_id!r}")
        loaded = self._as_out_in(param, loaded_weight)
        full = (self.output_size, self.input_size)[: param.dim()]
        check_loaded_shape(loaded, full, param)
        shard = param.shape[0]
        copy_checked(param.data, loaded.narrow(0, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # [..., out / tp]
        if self.gather_output:
            y = tensor_model_parallel_all_gather(y, dim=-1)  # [..., out]
        return y


class RowParallelLinear(LinearBase):
    """Y = X W^T + b with W split along the input dimension (dim 1) over TP ranks.

    The input is already split (`input_is_parallel=True`, the output of a column-parallel
    layer) or is split here. Partial products are summed with an all-reduce; the bias is
    replicated and added once, after the reduction. With `reduce_results=False` the
    caller reduces later, so only rank 0 adds the bias.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        reduce_results: bool = True,
        params_dtype: torch.dtype | None = None,
        transposed: bool = False,
    ):
        in_local = divide(input_size, get_tp_size())
        super().__init__(
            input_size,
            output_size,
            output_size,
            in_local,
            bias,
            output_size,
            params_dtype,
            transposed,
        )
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard id, got {shard_id!r}")
        loaded = self._as_out_in(param, loaded_weight)
        if param.dim() == 1:
            # The bias is replicated: every rank holds all of it.
            check_loaded_shape(loaded, (self.output_size,), param)
            copy_checked(param.data, loaded)
            return
        check_loaded_shape(loaded, (self.output_size, self.input_size), param)
        shard = param.shape[1]
        copy_checked(param.data, loaded.narrow(1, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        if not self.input_is_parallel:
            x = x.narrow(-1, self.tp_rank * self.in_features, self.in_features)  # [..., in / tp]
        if not self.reduce_results:
            bias = self.bias if self.tp_rank == 0 else None
            return F.linear(x, self.weight, bias)  # [..., out], partial sum
        y = tensor_model_parallel_all_reduce(F.linear(x, self.weight))  # [..., out]
        if self.bias is not None:
            y = y + self.bias
        return y
