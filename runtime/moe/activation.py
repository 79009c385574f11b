"""The experts' activation: which function, and the gate/up combination around it.

transformers' experts apply ``act_fn(gate) * up`` (the default ``_apply_gate``), ``act_fn(up)``
without a gate (``has_gate=False``), or a clamped SwiGLU in their own ``_apply_gate``:

- gpt-oss: ``gate.clamp(max=L)``, ``up.clamp(-L, L)``, ``gate * sigmoid(alpha * gate) * (up + 1)``;
- DeepSeek-V4 / HY-V4 / GLM-5-Next: ``act(gate.clamp(max=L)) * up.clamp(-L, L)``;
- Step-3.7: ``act(gate).clamp(max=L) * up.clamp(-L, L)`` (the clamp after the activation).

`ExpertActivation` names one such combination; the torch reference (`apply_gate`) and the
Triton epilogue (`runtime.moe.triton_gemm`) implement exactly the same formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# transformers' ACT2FN names -> (kernel function, implied sigmoid scale alpha)
_ACTIVATIONS: dict[str, tuple[str, float | None]] = {
    "silu": ("silu", None),
    "swish": ("silu", None),
    "quick_gelu": ("silu", 1.702),  # x * sigmoid(1.702 x)
    "gelu": ("gelu", None),
    "gelu_python": ("gelu", None),
    "gelu_pytorch_tanh": ("gelu_tanh", None),
    "gelu_python_tanh": ("gelu_tanh", None),
    "gelu_new": ("gelu_tanh", None),
    "gelu_fast": ("gelu_tanh", None),
    "relu": ("relu", None),
    "relu2": ("relu2", None),
    "sigmoid": ("sigmoid", None),
}
# The integer each function is compiled as in the Triton epilogue (a constexpr).
KERNEL_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "sigmoid")


@dataclass(frozen=True)
class ExpertActivation:
    """``function`` is a kernel function name (`KERNEL_ACTIVATIONS`). ``alpha`` scales the
    sigmoid's argument of ``silu`` (``x * sigmoid(alpha * x)``: gpt-oss's 1.702, quick_gelu).
    ``limit`` clamps the gate from above (before the activation, or after it with
    ``limit_after_activation``) and ``up`` to ``[-limit, limit]``; ``up_offset`` is added to
    ``up`` after its clamp (gpt-oss: ``(up + 1)``). ``has_gate=False``: ``function(up)``."""

    function: str = "silu"
    alpha: float = 1.0
    limit: float | None = None
    limit_after_activation: bool = False
    up_offset: float = 0.0
    has_gate: bool = True

    @classmethod
    def from_hf(
        cls,
        activation: str,
        *,
        has_gate: bool = True,
        alpha: float | None = None,
        limit: float | None = None,
        limit_after_activation: bool = False,
        up_offset: float = 0.0,
    ) -> ExpertActivation:
        """From a transformers activation name (``config.hidden_act``) and the clamp options."""
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"expert activation {activation!r} is not supported by FusedMoE; "
                f"supported: {', '.join(sorted(_ACTIVATIONS))}"
            )
        function, implied_alpha = _ACTIVATIONS[activation]
        if alpha is not None and function != "silu":
            raise ValueError(f"alpha applies to silu-type activations only, not {activation!r}")
        if not has_gate and (limit is not None or up_offset):
            raise ValueError("limit / up_offset clamp a gated activation; has_gate=False has none")
        if limit is not None and not (limit > 0 and math.isfinite(limit)):
            limit = None  # transformers uses inf / 0 / None for "no clamp"
        return cls(
            function=function,
            alpha=float(alpha if alpha is not None else implied_alpha or 1.0),
            limit=None if limit is None else float(limit),
            limit_after_activation=bool(limit_after_activation),
            up_offset=float(up_offset),
            has_gate=has_gate,
        )

    @property
    def kernel_id(self) -> int:
        return KERNEL_ACTIVATIONS.index(self.function)


def activate(x: torch.Tensor, function: str, alpha: float = 1.0) -> torch.Tensor:
    """``function(x)`` in x's dtype, as transformers' ACT2FN computes it."""
    if function == "silu":
        return F.silu(x) if alpha == 1.0 else x * torch.sigmoid(alpha * x)
    if function == "gelu":
        return F.gelu(x)
    if function == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if function == "relu":
        return F.relu(x)
    if function == "relu2":
        return torch.square(F.relu(x))
    if function == "sigmoid":
        return torch.sigmoid(x)
    raise ValueError(f"unknown expert activation function {function!r}")


def apply_gate(
    gate_up: torch.Tensor,  # [S, 2I] (gate | up) or [S, I] (up only, has_gate=False)
    act: ExpertActivation,
) -> torch.Tensor:  # [S, I]
    """The reference of the Triton epilogue, in ``gate_up``'s dtype."""
    if not act.has_gate:
        return activate(gate_up, act.function, act.alpha)
    gate, up = gate_up.chunk(2, dim=-1)
    if act.limit is not None and not act.limit_after_activation:
        gate = gate.clamp(max=act.limit)
    out = activate(gate, act.function, act.alpha)
    if act.limit is not None:
        if act.limit_after_activation:
            out = out.clamp(max=act.limit)
        up = up.clamp(min=-act.limit, max=act.limit)
    if act.up_offset:
        up = up + act.up_offset
    return out * up
