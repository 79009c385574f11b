"""Which experts, and which slice of each, this rank holds.

Tensor parallel (the default): every rank holds every expert, sharded over the intermediate
dimension (gate/up column-wise, down row-wise); each rank's output is a partial sum.

Expert parallel: the experts are dealt out whole, in contiguous ranges (sizes differing by
at most one); a rank computes only the (token, expert) pairs routed to its own experts, the
others contributing zero. Both end in the same all-reduce over the group. Every rank
already holds every token (the attention before the layer is tensor parallel and ends
replicated), so no all-to-all dispatch is needed: the all-reduce that TP needs anyway does
the combine, and EP only changes which products each rank computes. EP trades TP's
``1 / tp`` of every expert's GEMM (small, badly shaped tiles when the intermediate size
is small: 768 / 8 = 96 columns for Qwen3-30B-A3B) for whole-expert GEMMs on a subset of
the routed pairs, at the cost of load imbalance when routing is skewed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.parallel import divide, expert_parallel_enabled, get_tp_rank, get_tp_size


@dataclass(frozen=True)
class ExpertPartition:
    num_experts: int  # global expert count (the router's)
    intermediate_size: int  # global per-expert intermediate size
    expert_parallel: bool
    expert_start: int  # first expert held here
    num_local_experts: int
    intermediate_start: int  # offset of this rank's intermediate slice
    local_intermediate_size: int

    @classmethod
    def create(
        cls, num_experts: int, intermediate_size: int, expert_parallel: bool | None = None
    ) -> ExpertPartition:
        """This rank's share under the current parallel state; ``expert_parallel=None``
        follows `init_parallel(..., expert_parallel=...)`."""
        if expert_parallel is None:
            expert_parallel = expert_parallel_enabled()
        size, rank = get_tp_size(), get_tp_rank()
        if num_experts < 1 or intermediate_size < 1:
            raise ValueError(
                f"FusedMoE needs at least one expert and a positive intermediate size, "
                f"got num_experts={num_experts}, intermediate_size={intermediate_size}"
            )
        if expert_parallel and size > 1:
            if num_experts < size:
                raise ValueError(
                    f"expert parallelism over {size} ranks needs at least {size} experts, "
                    f"got {num_experts}"
                )
            base, extra = divmod(num_experts, size)
            start = rank * base + min(rank, extra)
            count = base + (1 if rank < extra else 0)
            return cls(num_experts, intermediate_size, True, start, count, 0, intermediate_size)
        local = divide(intermediate_size, size)
        return cls(num_experts, intermediate_size, False, 0, num_experts, rank * local, local)

    @property
    def all_experts_local(self) -> bool:
        return self.num_local_experts == self.num_experts

    def local_expert(self, expert: int) -> int | None:
        """The local index of global ``expert``, or None when another rank holds it."""
        local = expert - self.expert_start
        return local if 0 <= local < self.num_local_experts else None

    def expert_map(self) -> torch.Tensor:  # [num_experts] int32
        """Global expert id -> local index, -1 for experts held elsewhere."""
        ids = torch.arange(self.num_experts, dtype=torch.int32) - self.expert_start
        ids[(ids < 0) | (ids >= self.num_local_experts)] = -1
        return ids
