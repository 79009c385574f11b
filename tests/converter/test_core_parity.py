"""Quick parity gate for the core converter passes (C1), TP=1, no TP/weights stages.

For each architecture: a tiny random HF model (eager attention, float32) saved with
`save_pretrained`; the CORE-converted module imported and loaded name-for-name from the
safetensors (strict, tied weights from `ctx.tied_weights_keys`); then one flattened
prefill of 3 sequences of different lengths (every position's logits compared) and
decode steps through the paged cache (torch reference backend), against HF run on each
whole sequence. The full harness (TP=2, chunked prefill, real load_weights) is
tests/parity/.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from converter.pipeline import CORE, convert_source  # noqa: E402
from runtime.attention import InputMetadata, attention_layers  # noqa: E402

MODELS = Path(transformers.__file__).parent / "models"
BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    initializer_range=0.2,
    max_position_embeddings=64,
)
CONFIGS = {
    "opt": dict(ffn_dim=128, word_embed_proj_dim=32, num_key_value_heads=None),
    # opt-350m style: post-LN, no final layer norm
    "opt-postln": dict(ffn_dim=128, num_key_value_heads=None, do_layer_norm_before=False),
    "llama": {},
    "mistral": dict(sliding_window=4),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=16),
    "phi3": dict(sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
PROMPT_LENS = [5, 9, 3]
DECODE_STEPS = 4
BLOCK_SIZE = 4
TOL = 1e-4


def tiny_config(case: str):
    model_type = case.split("-")[0]
    kwargs = {**BASE, **CONFIGS[case]}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def import_generated(code: str, name: str, tmp: Path):
    path = tmp / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(f"_core_parity_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_strict(model: torch.nn.Module, ckpt: dict[str, torch.Tensor], ctx, config) -> None:
    """Name-for-name copy: every checkpoint key used, every parameter loaded."""
    params = dict(model.named_parameters())
    unused = set(ckpt)
    tied = ctx.tied_weights_keys if getattr(config, "tie_word_embeddings", False) else {}
    for name, param in params.items():
        key = name if name in ckpt else tied.get(name)
        assert key in ckpt, f"parameter {name} has no checkpoint key"
        assert param.shape == ckpt[key].shape, (name, param.shape, ckpt[key].shape)
        with torch.no_grad():
            param.copy_(ckpt[key])
        unused.discard(key)
    assert not unused, f"unused checkpoint keys {sorted(unused)}"


def run_paged(model, seqs, steps, num_blocks):
    """Prefill all prompts in one flattened batch, then `steps` decodes; yields logits."""
    layers = attention_layers(model)
    caches = [torch.zeros(layer.kv_cache_shape(num_blocks, BLOCK_SIZE)) for layer in layers]
    per_seq = num_blocks // len(seqs)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).tolist()
    tables = [perm[i * per_seq : (i + 1) * per_seq] for i in range(len(seqs))]
    prompt = [s[: PROMPT_LENS[i]] for i, s in enumerate(seqs)]
    ids = torch.cat(prompt)
    positions = torch.cat([torch.arange(len(p)) for p in prompt])
    meta = InputMetadata.build(
        tables, [0] * len(seqs), PROMPT_LENS, BLOCK_SIZE, logits_indices=list(range(len(ids)))
    )
    with torch.no_grad():
        hidden = model(ids, positions, caches, meta)
        yield model.compute_logits(hidden, meta)
        for step in range(steps):
            ctxs = [PROMPT_LENS[i] + step for i in range(len(seqs))]
            ids = torch.stack([seqs[i][c] for i, c in enumerate(ctxs)])
            meta = InputMetadata.build(tables, ctxs, [1] * len(seqs), BLOCK_SIZE)
            hidden = model(ids, torch.tensor(ctxs), caches, meta)
            yield model.compute_logits(hidden, meta)


def parity_diffs(case: str, tmp_path: Path, tamper=None) -> list[float]:
    """Max |logit diff| vs HF for the prefill, then each decode step."""
    model_type = case.split("-")[0]
    source = MODELS / model_type / f"modeling_{model_type}.py"
    core = convert_source(source.read_text(), source, stages=CORE, render=False)
    generated = import_generated(core.code, case.replace("-", "_"), tmp_path)
    config = tiny_config(case)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path / "ckpt")
    ckpt = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    model = getattr(generated, core.ctx.lm_class)(config).eval()
    load_strict(model, ckpt, core.ctx, config)
    if tamper is not None:
        tamper(model)

    gen = torch.Generator().manual_seed(0)
    seqs = [
        torch.randint(0, config.vocab_size, (n + DECODE_STEPS,), generator=gen) for n in PROMPT_LENS
    ]
    outputs = run_paged(model, seqs, DECODE_STEPS, num_blocks=3 * 6)
    prefill = next(outputs)
    with torch.no_grad():
        ref = torch.cat([hf(s[:n][None]).logits[0] for s, n in zip(seqs, PROMPT_LENS)])
    diffs = [(prefill - ref).abs().max().item()]
    for step, logits in enumerate(outputs):
        with torch.no_grad():
            ref = torch.stack(
                [hf(s[: n + step + 1][None]).logits[0, -1] for s, n in zip(seqs, PROMPT_LENS)]
            )
        diffs.append((logits - ref).abs().max().item())
    assert ref.abs().max() > 1.0  # logits are O(1-10): the comparison is meaningful
    return diffs


@pytest.mark.parametrize("case", list(CONFIGS))
def test_core_parity(case, tmp_path):
    diffs = parity_diffs(case, tmp_path)
    print(f"{case}: prefill {diffs[0]:.2e}, decode max {max(diffs[1:]):.2e}")
    assert max(diffs) < TOL, f"{case}: max |logit diff| per step {diffs}"


def test_parity_check_is_sensitive(tmp_path):
    """Sliding window switched off in the converted model: the check must notice."""

    def no_window(model):
        for layer in attention_layers(model):
            layer.sliding_window = None

    assert max(parity_diffs("mistral", tmp_path, no_window)) > 1e-2
