"""Torch backend of `FusedMoE` (CPU serving, and the oracle of the Triton kernels' tests).

Same semantics as `runtime.moe.triton_ops.fused_experts`: every (token, k) pair routed to an
expert held here computes ``down(gate(act)(gate_up(x))) * weight`` (with the weight applied
to the expert's input instead when ``apply_router_weight_on_input``); pairs routed
elsewhere contribute zero; a token's pairs are summed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.moe.activation import ExpertActivation, apply_gate


def fused_experts_ref(
    hidden_states: torch.Tensor,  # [T, H]
    w_in: torch.Tensor,  # [E_local, 2I or I, H] gate_up (or up) in the held layout
    w_down: torch.Tensor,  # [E_local, H, I]
    top_k_index: torch.Tensor,  # [T, k] global expert ids
    top_k_weights: torch.Tensor,  # [T, k]
    activation: ExpertActivation,
    *,
    b_in: torch.Tensor | None = None,  # [E_local, 2I or I]
    b_down: torch.Tensor | None = None,  # [E_local, H]
    expert_map: torch.Tensor | None = None,  # [E] global -> local, -1 elsewhere
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:  # [T, H] in hidden_states' dtype
    num_tokens, top_k = top_k_index.shape
    local_ids = top_k_index.reshape(-1).long()  # [S] pair s = t * k + j
    if expert_map is not None:
        local_ids = expert_map.to(local_ids.device)[local_ids].long()
    weights = top_k_weights.reshape(-1)  # [S]
    out = hidden_states.new_zeros(num_tokens * top_k, w_down.shape[1], dtype=torch.float32)
    order = torch.argsort(local_ids, stable=True)  # pairs grouped by expert
    counts = torch.bincount(local_ids.clamp(min=-1) + 1, minlength=w_in.shape[0] + 1)
    start = int(counts[0])  # pairs routed to other ranks' experts sort first (id -1)
    for expert, count in enumerate(counts[1:].tolist()):
        if count == 0:
            continue
        pairs = order[start : start + count]  # [n]
        start += count
        x = hidden_states[pairs // top_k].to(w_in.dtype)  # [n, H] (F.linear's precision)
        w = weights[pairs, None]  # [n, 1]
        if apply_router_weight_on_input:
            x = x * w.to(x.dtype)
        h = F.linear(x, w_in[expert], None if b_in is None else b_in[expert])  # [n, 2I]
        h = apply_gate(h, activation)  # [n, I]
        y = F.linear(h, w_down[expert], None if b_down is None else b_down[expert])  # [n, H]
        if not apply_router_weight_on_input:
            y = y * w.to(y.dtype)
        out[pairs] = y.float()
    return out.view(num_tokens, top_k, w_down.shape[1]).sum(dim=1).to(hidden_states.dtype)
