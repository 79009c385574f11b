"""Quick parity gate for the stages before TP (imports .. prune), TP=1, no TP/weights.

For each architecture: a tiny random HF model (eager attention, float32) saved with
`save_pretrained`; the module converted by the stages before TP imported and loaded name-for-name from the
safetensors (strict, tied weights from `ctx.tied_weights_keys`); then one flattened
prefill of 3 sequences of different lengths (every position's logits compared), decode
steps through the paged cache and a chunked prefill (`hf2paged.verify.parity`'s scenario,
through the engine's ModelRunner), against HF run on each whole sequence. The full
harness (TP=2, real load_weights) is tests/parity/.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from converter.passes import tp  # noqa: E402
from converter.pipeline import STAGES, convert_source  # noqa: E402
from hf2paged.verify.parity import (  # noqa: E402
    ParityReport,
    Scenario,
    compare,
    hf_reference,
    run_generated,
)
from runtime.attention import attention_layers  # noqa: E402

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
SCENARIO = Scenario(prompt_lens=(5, 9, 3), decode_steps=4, chunks=(4, 3), block_size=4)
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


def parity_report(case: str, tmp_path: Path, tamper=None) -> ParityReport:
    """Max |logit diff| vs HF for the prefill, each decode step and the chunked prefill."""
    model_type = case.split("-")[0]
    source = MODELS / model_type / f"modeling_{model_type}.py"
    core = convert_source(source.read_text(), source, stages=STAGES[: STAGES.index(tp.run)])
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
    tokens = SCENARIO.tokens(config.vocab_size)
    reference = hf_reference(hf, tokens)
    # logits are O(1-10): the comparison is meaningful
    assert max(r.abs().max() for r in reference) > 1.0
    return compare(case, run_generated(model, tokens, SCENARIO), reference)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_core_parity(case, tmp_path):
    report = parity_report(case, tmp_path)
    print(report.format())
    assert report.max_diff < TOL, report.format()


def test_parity_check_is_sensitive(tmp_path):
    """Sliding window switched off in the converted model: the check must notice."""

    def no_window(model):
        for layer in attention_layers(model):
            layer.sliding_window = None

    assert parity_report("mistral", tmp_path, no_window).max_diff > 1e-2
