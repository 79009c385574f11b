"""What `LLM` checks and loads before it starts: the model directory (config, generated
class, TP divisibility, tokenizer, EOS ids) and, later, each request (`RequestChecker`,
which a front end in another process builds for itself from the engine's limits)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from runtime.engine.sampling_params import SamplingParams
from runtime.loader import load_config

log = logging.getLogger(__name__)


def architecture(config) -> str | None:
    """`config.architectures[0]`; for configs without it (those read from GGUF files),
    transformers' causal-LM class of the config's model type."""
    archs = getattr(config, "architectures", None)
    if archs:
        return archs[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))


def check_model(
    model_dir: Path,
    tensor_parallel_size: int,
    trust_remote_code: bool = False,
    model_class: type | None = None,
    expert_parallel: bool = False,
):
    """The model's transformers config, once everything that would fail in a worker
    process has been checked here (one-line ValueErrors). `model_class`: the class to
    serve, instead of the registry's for the config's architecture."""
    import generated

    if not model_dir.exists():
        raise ValueError(f"{model_dir}: no such model directory")
    try:
        config = load_config(model_dir, trust_remote_code=trust_remote_code)
    except (FileNotFoundError, OSError) as exc:
        raise ValueError(f"{model_dir}: cannot read the model config ({exc})") from None
    if model_class is None:
        arch = architecture(config)
        if arch is None:
            raise ValueError(f'{model_dir}: the config names no architecture ("architectures")')
        generated.get_model_class(arch, getattr(config, "model_type", None))  # ValueError if absent
    tp = tensor_parallel_size
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tp!r}")
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads is not None and heads % tp != 0:
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide the model's {heads} attention heads"
        )
    if kv_heads is not None and kv_heads % tp != 0 and tp % kv_heads != 0:
        raise ValueError(
            f"tensor_parallel_size={tp} neither divides nor is a multiple of the model's "
            f"{kv_heads} key/value heads"
        )
    if not isinstance(expert_parallel, bool):
        raise ValueError(f"expert_parallel must be a bool, got {expert_parallel!r}")
    experts = next(
        (getattr(text, k) for k in _EXPERT_COUNTS if isinstance(getattr(text, k, None), int)), None
    )
    if expert_parallel and tp > 1 and experts is not None and experts < tp:
        raise ValueError(
            f"expert_parallel over tensor_parallel_size={tp} ranks needs at least {tp} "
            f"experts; the model has {experts}"
        )
    return config


# config fields holding the routed-expert count (transformers' MoE configs)
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    """transformers' tokenizer of the model directory (or of its GGUF file); None when
    the directory has none (tiny test checkpoints): prompts are then token ids.
    `trust_remote_code` as for the config (never a prompt)."""
    from transformers import AutoTokenizer

    try:
        if model_dir.is_file() and model_dir.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(model_dir.parent), gguf_file=model_dir.name)
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        log.info("no tokenizer in %s (%s); prompts must be token ids", model_dir, exc)
        return None


def eos_token_ids(model_dir: Path, config, tokenizer) -> list[int]:
    """EOS ids from the config, the generation config and the tokenizer together, as
    transformers' `generate` stops on any of them."""
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(config.get_text_config(), "eos_token_id", None))
    if model_dir.is_dir() and (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            add(GenerationConfig.from_pretrained(str(model_dir)).eos_token_id)
        except (OSError, ValueError) as exc:
            log.info("unreadable generation_config.json in %s (%s)", model_dir, exc)
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return sorted(ids)


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed `check_request`: its prompt as token ids (and text, when it
    was given as text) and its sampling parameters."""

    prompt_token_ids: list[int]
    prompt: str | None
    sampling_params: SamplingParams


def check_request(
    prompt: str | list[int],
    params: SamplingParams | None,
    tokenizer,
    vocab_size: int,
    max_model_len: int,
    limits: str = "",
) -> tuple[list[int], str | None, SamplingParams]:
    """(prompt token ids, prompt text or None, params) of a valid request; a one-line
    ValueError otherwise, before anything is scheduled."""
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model directory has no tokenizer; pass token ids, not text")
        ids, text = list(tokenizer.encode(prompt)), prompt
    else:
        ids, text = list(prompt), None
        bad = [
            t
            for t in ids
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size
        ]
        if bad:
            raise ValueError(
                f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})"
            )
    if not ids:
        raise ValueError("empty prompt: give at least one token")
    if len(ids) >= max_model_len:
        raise ValueError(
            f"prompt of {len(ids)} tokens leaves no room to generate: the context is "
            f"{max_model_len} tokens" + (f" ({limits})" if limits else "")
        )
    unknown = [t for t in params.stop_token_ids if t >= vocab_size]
    if unknown:
        raise ValueError(f"stop_token_ids {unknown} are outside the vocabulary [0, {vocab_size})")
    if params.stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer; this model directory has none")
    return ids, text, params


class RequestChecker:
    """Validates and tokenizes requests for one engine, and renders chat prompts: the
    tokenizer and the engine's limits, nothing that steps. `LLM` has one; a front end in
    another process than the engine builds its own (`for_model`) from the same limits, so
    a bad request fails where it arrives."""

    def __init__(
        self, model: Path, tokenizer, vocab_size: int, max_model_len: int, limits: str = ""
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len  # prompt + output, in tokens
        self.limits = limits  # what bounds max_model_len, for the too-long message

    @classmethod
    def for_model(
        cls,
        model: Path,
        vocab_size: int,
        max_model_len: int,
        limits: str = "",
        trust_remote_code: bool = False,
    ) -> RequestChecker:
        """A checker with the model directory's own tokenizer, loaded here."""
        return cls(
            model, load_tokenizer(model, trust_remote_code), vocab_size, max_model_len, limits
        )

    def check(self, prompt: str | list[int], params: SamplingParams | None) -> CheckedRequest:
        """The request's token ids and parameters; a one-line ValueError when bad."""
        return CheckedRequest(
            *check_request(
                prompt, params, self.tokenizer, self.vocab_size, self.max_model_len, self.limits
            )
        )

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a chat (`[{"role": ..., "content": ...}]`), ready for the
        assistant's answer, per the tokenizer's chat template."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.model} has no chat template")
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
