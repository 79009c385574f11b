"""Tiny random checkpoints for engine tests: one per generated architecture (the parity
suite's configs), saved with a character-level tokenizer so text, stop strings and
streaming can be tested without a model hub."""

from __future__ import annotations

from pathlib import Path

import torch
from parity.configs import CONFIGS
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast


def char_tokenizer(vocab_size: int, specials: dict[str, int]) -> PreTrainedTokenizerFast:
    """One token per printable character; `specials` (pad/bos/eos) keep the config's ids."""
    vocab = dict(specials)
    ordinary = (i for i in range(vocab_size) if i not in specials.values())
    for i, code in zip(ordinary, range(32, 0x10FFFF)):
        vocab[chr(code)] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_model_dir(arch: str, root: Path, with_tokenizer: bool = True):
    """Save a tiny random `arch` model under root/arch; returns (dir, HF model)."""
    kwargs = dict(CONFIGS[arch])  # a case may pick its config class by `model_type`
    impl = kwargs.pop("attn_implementation", "eager")  # and its HF reference path
    config = AutoConfig.for_model(kwargs.pop("model_type", arch), **kwargs)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    model_dir = root / arch
    hf.save_pretrained(model_dir)
    if with_tokenizer:
        save_char_tokenizer(config, model_dir)
    return model_dir, hf


def save_char_tokenizer(config, model_dir: Path) -> None:
    """A character tokenizer beside the checkpoint: the config's special ids where it has
    them; a free id for missing or shared ones (OPT has bos == eos, GPT-2 no pad)."""
    specials: dict[str, int] = {}
    wanted = [
        ("</s>", config.eos_token_id),
        ("<s>", config.bos_token_id),
        ("<pad>", config.pad_token_id),
    ]
    for name, token_id in wanted:
        if not isinstance(token_id, int) or token_id in specials.values():
            token_id = min(set(range(config.vocab_size)) - set(specials.values()))
        specials[name] = token_id
    char_tokenizer(config.vocab_size, specials).save_pretrained(model_dir)


def build_tiny_dir(model_type: str, root: Path) -> Path:
    """Coverage's tiny checkpoint of `model_type` (rules/coverage.toml [tiny]: the config
    class's defaults shrunk; mixture-of-experts: 8 experts, top-2) with a character
    tokenizer, under root/model_type."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from hf2paged.verify.coverage_config import tiny_config
    from hf2paged.verify.coverage_rules import load_coverage_rules

    hf_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    config = tiny_config(model_type, hf_cls.config_class, load_coverage_rules())
    torch.manual_seed(0)
    hf = hf_cls._from_config(config, attn_implementation="eager").eval()
    model_dir = root / model_type
    hf.save_pretrained(model_dir)
    save_char_tokenizer(config, model_dir)
    return model_dir


def hf_greedy(hf, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt (stops at EOS like ours)."""
    out = hf.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=hf.config.pad_token_id if hf.config.pad_token_id is not None else hf.config.eos_token_id,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()
