"""`FusedMoE`: the module generated code puts where transformers has its experts class."""

from __future__ import annotations

import os

import torch
from torch import nn

from runtime.moe.activation import ExpertActivation
from runtime.moe.partition import ExpertPartition
from runtime.moe.reference import fused_experts_ref
from runtime.moe.weights import DOWN, GATE_UP, UP, ExpertLayout, ExpertWeightLoader
from runtime.parallel import get_tp_rank, get_tp_size, tensor_model_parallel_all_reduce
from runtime.parallel.weights import make_param

BACKENDS = ("torch", "triton")


def select_moe_backend(device: torch.device) -> str:
    """`HF2PAGED_MOE_BACKEND` (torch|triton) wins; else Triton on CUDA, torch elsewhere.

    On CPU, Triton runs only under `TRITON_INTERPRET=1` (tests on small shapes).
    """
    forced = os.environ.get("HF2PAGED_MOE_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"HF2PAGED_MOE_BACKEND={forced!r}; expected one of {BACKENDS}")
        return forced
    return "triton" if device.type == "cuda" else "torch"


class FusedMoE(nn.Module):
    """The routed experts of a mixture-of-experts block, called as transformers' experts:
    ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``
    (hidden states of any leading shape, ``[1, T, H]``, come back in that shape, as an
    experts loop that flattens its input and restores it returns them), token t's output
    being ``sum_j w[t, j] * expert_{index[t, j]}(x[t])`` with
    ``expert(x) = down(gate(act)(gate_up(x)))``.

    The layout flags are transformers' ``@use_experts_implementation`` ones and describe the
    checkpoint: ``is_transposed`` (weights ``[E, in, out]``), ``is_concatenated`` (gate/up
    ``[gate; up]``, else interleaved ``g0, u0, g1, ...``), ``has_bias``, ``has_gate``
    (``False``: ``up_proj`` and ``act(up)``). The parameters keep transformers' names
    (``gate_up_proj`` / ``up_proj``, ``down_proj``, ``*_bias``) so checkpoint keys map 1:1;
    held in the kernels' layout (`runtime.moe.weights`), loaded through their
    `weight_loader` from the fused 3-D tensor or one expert's tensor at a time.

    ``activation`` is transformers' ``hidden_act`` name; ``alpha``, ``limit``,
    ``limit_after_activation``, ``up_offset`` describe a clamped SwiGLU
    (`runtime.moe.activation`; gpt-oss: ``alpha=1.702, limit=7.0, up_offset=1.0``).
    ``apply_router_weight_on_input``: the routing weight scales the expert's input rather
    than its output (Llama 4). ``identity_experts``: that many more expert ids, ``E ..
    E + identity_experts - 1``, are zero-computation experts that return their input
    (LongCat-Flash's zero experts): a token's pairs routed there add ``w * x``. They hold no
    weights; a checkpoint's in-projection may still carry rows for them (the source
    allocates them unused), which load nowhere.

    Parallelism (`runtime.moe.partition`): tensor parallel shards every expert's
    intermediate dimension; ``expert_parallel=True`` (default: `init_parallel`'s option)
    places whole experts per rank instead. Either way one all-reduce sums the ranks'
    partial outputs (``reduce_results=False`` leaves it to the caller).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation: str = "silu",
        has_gate: bool = True,
        is_concatenated: bool = True,
        is_transposed: bool = False,
        has_bias: bool = False,
        alpha: float | None = None,
        limit: float | None = None,
        limit_after_activation: bool = False,
        up_offset: float = 0.0,
        apply_router_weight_on_input: bool = False,
        identity_experts: int = 0,
        expert_parallel: bool | None = None,
        reduce_results: bool = True,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = ExpertActivation.from_hf(
            activation,
            has_gate=has_gate,
            alpha=alpha,
            limit=limit,
            limit_after_activation=limit_after_activation,
            up_offset=up_offset,
        )
        self.layout = ExpertLayout(hidden_size, is_transposed, is_concatenated, has_gate)
        self.has_bias = has_bias
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self.identity_experts = identity_experts
        self.reduce_results = reduce_results
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        self.partition = ExpertPartition.create(num_experts, intermediate_size, expert_parallel)
        part = self.partition
        self.num_local_experts = part.num_local_experts
        self.local_intermediate_size = part.local_intermediate_size
        E, H, I = part.num_local_experts, hidden_size, part.local_intermediate_size  # noqa: E741
        in_kind, in_rows = (GATE_UP, 2 * I) if has_gate else (UP, I)
        self._in_name = f"{in_kind}_proj"
        self._add(self._in_name, in_kind, False, E, in_rows, H, dtype=params_dtype)
        self._add("down_proj", DOWN, False, E, H, I, dtype=params_dtype)
        if has_bias:
            self._add(f"{self._in_name}_bias", in_kind, True, E, in_rows, dtype=params_dtype)
            self._add("down_proj_bias", DOWN, True, E, H, dtype=params_dtype)
        # The routing width (k of top_k_index) of the calls so far: None before the first.
        self.routed_top_k: int | None = None
        if part.all_experts_local:
            self.expert_map = None
        else:
            self.register_buffer("expert_map", part.expert_map(), persistent=False)

    def _add(self, name: str, kind: str, is_bias: bool, *shape: int, dtype) -> None:
        param = make_param(*shape, dtype=dtype)
        param.weight_loader = ExpertWeightLoader(
            kind, is_bias, self.layout, self.partition, self.identity_experts
        )
        param.module_list_size = self.num_experts  # experts a checkpoint must provide
        self.register_parameter(name, param)

    def extra_repr(self) -> str:
        p, a = self.partition, self.activation
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, activation={a.function}, "
            f"has_gate={a.has_gate}, has_bias={self.has_bias}, "
            f"local_experts={p.num_local_experts}, local_intermediate={p.local_intermediate_size}"
            + (", expert_parallel=True" if p.expert_parallel else "")
            + (f", identity_experts={self.identity_experts}" if self.identity_experts else "")
        )

    # A graph break under torch.compile (runtime/engine/compile.py): the expert kernels
    # run eagerly between the compiled pieces of a block (routing stays compiled).
    @torch.compiler.disable
    def forward(
        self,
        hidden_states: torch.Tensor,  # [T, H], or [..., H] with T tokens in all
        top_k_index: torch.Tensor,  # [T, k] expert ids
        top_k_weights: torch.Tensor,  # [T, k]
    ) -> torch.Tensor:  # hidden_states' shape
        shape = hidden_states.shape
        if hidden_states.dim() < 2 or shape[-1] != self.hidden_size:
            raise ValueError(
                f"FusedMoE takes hidden_states [T, {self.hidden_size}] (or [..., "
                f"{self.hidden_size}]), got {tuple(shape)}"
            )
        hidden_states = hidden_states.reshape(-1, self.hidden_size)  # [T, H]
        if top_k_index.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"FusedMoE got {hidden_states.shape[0]} tokens but top_k_index "
                f"{tuple(top_k_index.shape)}"
            )
        self.routed_top_k = top_k_index.shape[1]
        identity = None
        if self.identity_experts:
            # pairs routed to a zero-computation expert (ids >= E) add w * x, once over the
            # ranks (rank 0, before the all-reduce); the kernels see them with weight 0
            routed = top_k_index < self.num_experts  # [T, k]
            if self.tp_rank == 0:
                kept = top_k_weights.masked_fill(routed, 0).sum(-1, keepdim=True)  # [T, 1]
                identity = hidden_states * kept.to(hidden_states.dtype)  # [T, H]
            top_k_weights = top_k_weights.masked_fill(~routed, 0)
            top_k_index = top_k_index.masked_fill(~routed, 0)
        w_in = getattr(self, self._in_name)
        b_in = getattr(self, f"{self._in_name}_bias") if self.has_bias else None
        b_down = self.down_proj_bias if self.has_bias else None
        if b_down is not None and self.tp_size > 1 and not self.partition.expert_parallel:
            # Every rank holds every expert's (replicated) down bias: add it once.
            b_down = b_down if self.tp_rank == 0 else None
        kwargs = dict(
            b_in=b_in,
            b_down=b_down,
            expert_map=self.expert_map,
            apply_router_weight_on_input=self.apply_router_weight_on_input,
        )
        if select_moe_backend(hidden_states.device) == "triton":
            from runtime.moe.triton_ops import fused_experts

            out = fused_experts(
                hidden_states, w_in, self.down_proj, top_k_index, top_k_weights,
                self.activation, **kwargs,
            )  # fmt: skip
        else:
            out = fused_experts_ref(
                hidden_states, w_in, self.down_proj, top_k_index, top_k_weights,
                self.activation, **kwargs,
            )  # fmt: skip
        if identity is not None:
            out = out + identity
        if self.reduce_results and self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out.view(shape)

    def kernel_variant(self) -> tuple:
        """What the expert kernels compile for besides the token count: layers with the
        same value share every compiled kernel."""
        w_in = getattr(self, self._in_name)
        return (
            tuple(w_in.shape), tuple(self.down_proj.shape), w_in.dtype, w_in.device,
            self.routed_top_k, self.activation, self.has_bias,
            self.apply_router_weight_on_input, self.expert_map is None,
        )  # fmt: skip

    @torch.inference_mode()
    def warm_up(self, max_tokens: int) -> int:
        """Run the expert kernels once for each launch configuration a step of 1..max_tokens
        tokens selects (`config_change_token_counts`), so that serving compiles none of
        them; returns the number of runs. Needs a first call (the routing width); nothing
        to do for the torch backend. Under tensor parallelism every rank runs the same
        sizes, so the all-reduces pair up."""
        w_in = getattr(self, self._in_name)
        k = self.routed_top_k
        if k is None or select_moe_backend(w_in.device) != "triton":
            return 0
        from runtime.moe.triton_config import config_change_token_counts

        counts = config_change_token_counts(
            max_tokens, k, self.num_local_experts, self.hidden_size,
            self.local_intermediate_size, w_in.dtype, w_in.device,
        )  # fmt: skip
        for num_tokens in counts:
            x = w_in.new_zeros(num_tokens, self.hidden_size)
            ids = torch.arange(num_tokens * k, device=w_in.device) % self.num_experts
            self.forward(x, ids.view(num_tokens, k), x.new_ones(num_tokens, k))
        return len(counts)
