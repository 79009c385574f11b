"""Shared pieces of the FusedMoE tests: random experts in transformers' layouts, routings,
and the oracle, a plain per-expert loop written as transformers' eager experts are
(independent of runtime.moe: it reads the transformers layout directly and takes its
activation from transformers' ACT2FN)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from transformers.activations import ACT2FN

from runtime.moe import FusedMoE

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# max |out - oracle| / (max |oracle| + 1) allowed per parameter dtype (the oracle runs in
# fp32 on the same rounded weights; the layer rounds its intermediate to the dtype)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass
class Spec:
    """One experts class: transformers' layout flags and its activation options."""

    num_experts: int
    hidden: int
    inter: int
    activation: str = "silu"
    has_gate: bool = True
    is_concatenated: bool = True
    is_transposed: bool = False
    has_bias: bool = False
    alpha: float | None = None
    limit: float | None = None
    limit_after_activation: bool = False
    up_offset: float = 0.0
    apply_router_weight_on_input: bool = False

    def layer_kwargs(self) -> dict:
        return dict(
            activation=self.activation,
            has_gate=self.has_gate,
            is_concatenated=self.is_concatenated,
            is_transposed=self.is_transposed,
            has_bias=self.has_bias,
            alpha=self.alpha,
            limit=self.limit,
            limit_after_activation=self.limit_after_activation,
            up_offset=self.up_offset,
            apply_router_weight_on_input=self.apply_router_weight_on_input,
        )

    def layer(self, dtype: torch.dtype = torch.float32, **kwargs) -> FusedMoE:
        return FusedMoE(
            self.num_experts, self.hidden, self.inter, params_dtype=dtype,
            **self.layer_kwargs(), **kwargs,
        )  # fmt: skip

    @property
    def in_name(self) -> str:
        return "gate_up_proj" if self.has_gate else "up_proj"


@dataclass
class HFWeights:
    """Expert tensors exactly as transformers' experts class holds them."""

    spec: Spec
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def random(cls, spec: Spec, dtype: torch.dtype, seed: int = 0) -> HFWeights:
        g = torch.Generator().manual_seed(seed)
        E, H, I = spec.num_experts, spec.hidden, spec.inter  # noqa: E741
        rows = 2 * I if spec.has_gate else I

        def rand(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(dtype)

        t = {}
        t[spec.in_name] = rand(
            *((E, H, rows) if spec.is_transposed else (E, rows, H)), scale=H**-0.5
        )
        t["down_proj"] = rand(*((E, I, H) if spec.is_transposed else (E, H, I)), scale=I**-0.5)
        if spec.has_bias:
            t[spec.in_name + "_bias"] = rand(E, rows, scale=0.5)
            t["down_proj_bias"] = rand(E, H, scale=0.5)
        return cls(spec, t)

    def load_into(self, layer: FusedMoE) -> None:
        """Every tensor whole (shard_id None), through the parameters' weight_loader."""
        params = dict(layer.named_parameters())
        assert set(params) == set(self.tensors), (set(params), set(self.tensors))
        for name, tensor in self.tensors.items():
            params[name].weight_loader(params[name], tensor)

    def per_expert(self) -> dict[tuple[str, int], torch.Tensor]:
        """(projection, expert) -> its nn.Linear weight [out, in] (gate/up/down, as the
        per-expert checkpoints of Mixtral-style models hold them); concatenated gate/up only."""
        spec = self.spec
        out = {}
        w_in, w_down = self.tensors[spec.in_name], self.tensors["down_proj"]
        if spec.is_transposed:
            w_in, w_down = w_in.transpose(1, 2), w_down.transpose(1, 2)
        for e in range(spec.num_experts):
            if spec.has_gate:
                out["gate", e], out["up", e] = w_in[e].chunk(2, dim=0)
            else:
                out["up", e] = w_in[e]
            out["down", e] = w_down[e]
        return out

    def oracle(
        self,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, k]
        top_k_weights: torch.Tensor,  # [T, k]
        expert_subset: range | None = None,  # only these experts contribute (EP)
    ) -> torch.Tensor:  # [T, H] fp32
        spec = self.spec
        w = {k: v.float() for k, v in self.tensors.items()}
        x_all = hidden_states.float()
        act = ACT2FN[spec.activation]
        out = torch.zeros_like(x_all)
        for e in range(spec.num_experts):
            if expert_subset is not None and e not in expert_subset:
                continue
            token, pos = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            x, weight = x_all[token], top_k_weights[token, pos, None].float()
            if spec.apply_router_weight_on_input:
                x = x * weight
            w_in = w[spec.in_name][e]
            h = x @ w_in if spec.is_transposed else F.linear(x, w_in)
            if spec.has_bias:
                h = h + w[spec.in_name + "_bias"][e]
            if spec.has_gate:
                if spec.is_concatenated:
                    gate, up = h.chunk(2, dim=-1)
                else:
                    gate, up = h[..., ::2], h[..., 1::2]
                if spec.limit is not None and not spec.limit_after_activation:
                    gate = gate.clamp(max=spec.limit)
                a = gate * torch.sigmoid(spec.alpha * gate) if spec.alpha else act(gate)
                if spec.limit is not None:
                    if spec.limit_after_activation:
                        a = a.clamp(max=spec.limit)
                    up = up.clamp(-spec.limit, spec.limit)
                h = a * (up + spec.up_offset)
            else:
                h = act(h)
            w_down = w["down_proj"][e]
            y = h @ w_down if spec.is_transposed else F.linear(h, w_down)
            if spec.has_bias:
                y = y + w["down_proj_bias"][e]
            if not spec.apply_router_weight_on_input:
                y = y * weight
            out.index_add_(0, token, y)
        return out


def routing(
    num_tokens: int, num_experts: int, top_k: int, seed: int, busy_experts: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index [T, k] distinct experts per token, top_k_weights [T, k] fp32). With
    ``busy_experts``, tokens go only to that many (random) experts: the rest get none."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if busy_experts is not None:
        idle = torch.randperm(num_experts, generator=g)[max(busy_experts, top_k) :]
        scores[:, idle] = -1.0
    index = scores.topk(top_k, dim=-1).indices
    weights = torch.rand(num_tokens, top_k, generator=g) + 0.1
    return index, weights


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
    bound = TOLERANCE[dtype] * (ref.abs().max().item() + 1.0) if ref.numel() else 0.0
    assert err <= bound, f"max error {err:.3g} > {bound:.3g} ({dtype})"


GATED_ACTIVATIONS = ["silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "relu"]


@st.composite
def specs(draw, max_experts: int = 128, hidden=(8, 16, 24), inter=(4, 8, 12)) -> Spec:
    """Every layout flag and activation option transformers' experts use."""
    spec = Spec(
        num_experts=draw(st.integers(1, max_experts)),
        hidden=draw(st.sampled_from(hidden)),
        inter=draw(st.sampled_from(inter)),
        has_gate=draw(st.booleans()),
        is_transposed=draw(st.booleans()),
        has_bias=draw(st.booleans()),
        apply_router_weight_on_input=draw(st.booleans()),
    )
    if not spec.has_gate:
        spec.activation = draw(st.sampled_from(["relu2", "relu", "silu", "gelu", "sigmoid"]))
        return spec
    spec.is_concatenated = draw(st.booleans())
    style = draw(st.sampled_from(["plain", "gpt_oss", "clamped", "clamp_after"]))
    if style == "plain":
        spec.activation = draw(st.sampled_from(GATED_ACTIVATIONS))
    elif style == "gpt_oss":  # clamp, gate * sigmoid(alpha * gate) * (up + 1)
        spec.alpha, spec.limit, spec.up_offset = 1.702, draw(st.sampled_from([0.5, 7.0])), 1.0
    else:
        spec.limit = draw(st.sampled_from([0.3, 2.0]))
        spec.limit_after_activation = style == "clamp_after"
    return spec
