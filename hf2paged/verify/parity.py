"""Logit parity of a generated model against HF transformers (eager attention).

Shared by `hf2paged verify`, `hf2paged coverage` and the parity tests (tests/parity/).
The scenario drives the generated model through the engine's `ModelRunner` the way
serving does:

1. one flattened prefill of several prompts of different lengths (every position's
   logits compared, through `logits_indices`);
2. decode steps, one token per sequence per step, through the paged KV cache;
3. a chunked prefill: a new prompt split over several steps, each step batched with a
   decode of another sequence (prefill chunks and decodes mixed in one batch).

The reference is HF's forward over each whole sequence: causal attention makes its
logits at position i those of the step that fed token i. Blocks are handed out in a
scrambled order so block tables are not contiguous.

Heavy imports (torch, transformers, runtime, generated) happen inside functions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Scenario:
    prompt_lens: tuple[int, ...] = (5, 9, 3)
    decode_steps: int = 8
    chunks: tuple[int, ...] = (4, 4, 3)
    block_size: int = 4
    seed: int = 0

    def tokens(self, vocab_size: int) -> list[list[int]]:
        """Every sequence's full token list: prompts + decode tokens, then the chunked
        prompt (last); sequence 1 also decodes during the chunked steps."""
        rng = random.Random(self.seed)
        lens = [n + self.decode_steps for n in self.prompt_lens]
        lens[1 % len(lens)] += len(self.chunks)
        lens.append(sum(self.chunks))
        return [[rng.randrange(vocab_size) for _ in range(n)] for n in lens]


@dataclass
class Record:
    phase: str  # "prefill" | "decode" | "chunked"
    step: int
    seq: int
    start: int  # position of the first row
    logits: Any  # torch.Tensor [rows, vocab]


@dataclass
class ParityReport:
    arch: str
    prefill: float = 0.0
    decode: list[float] = field(default_factory=list)
    chunked: float = 0.0

    @property
    def max_diff(self) -> float:
        return max([self.prefill, self.chunked, *self.decode])

    def format(self) -> str:
        steps = " ".join(f"{d:.2e}" for d in self.decode)
        return (
            f"{self.arch}: max |logit diff| prefill {self.prefill:.2e}; "
            f"decode steps [{steps}]; chunked prefill {self.chunked:.2e}"
        )


class PagedSequences:
    """Sequences fed to a model step by step through the engine's `ModelRunner`, each with
    its own block table; blocks are handed out in a scrambled order, so consecutive blocks
    of a sequence are not adjacent in the cache."""

    def __init__(self, model, block_size: int, num_blocks: int, device, dtype) -> None:
        import torch

        from runtime.engine.model_runner import ModelRunner
        from runtime.kv_cache import allocate_kv_caches

        self.block_size = block_size
        # one cache per kv_cache_index (or per declared slot), as the engine allocates
        caches = allocate_kv_caches(model, num_blocks, block_size, dtype, device)
        self.runner = ModelRunner(model, caches, torch.device(device))
        self.free = list(range(num_blocks))
        random.Random(1).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, batch: list[tuple[int, list[int]]]) -> list[Any]:
        """Feed each (seq, new tokens) in one step; returns each sequence's logits
        ``[new tokens, vocab]`` (float32, CPU), one row per new token."""
        import torch

        from runtime.engine.step_inputs import StepInputs

        tables, ctx_lens, query_lens, ids = [], [], [], []
        for seq, toks in batch:
            done = self.lens.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            while len(table) * self.block_size < done + len(toks):
                table.append(self.free.pop())
            tables.append(table)
            ctx_lens.append(done)
            query_lens.append(len(toks))
            ids.extend(toks)
            self.lens[seq] = done + len(toks)
        inputs = StepInputs.build(
            tables, ctx_lens, query_lens, self.block_size, ids, logits_indices=range(len(ids))
        )
        logits = self.runner.execute(inputs).float().cpu()  # [T, vocab]
        return list(torch.split(logits, query_lens))


def run_generated(
    model, tokens: list[list[int]], scenario: Scenario, device="cpu", dtype=None
) -> list[Record]:
    """Drive `model` through the scenario; the logits of every step, per sequence."""
    import torch

    dtype = dtype or torch.float32
    total_blocks = sum(-(-len(t) // scenario.block_size) for t in tokens) + 4
    seqs = PagedSequences(model, scenario.block_size, total_blocks, device, dtype)
    records: list[Record] = []
    prompts = list(range(len(scenario.prompt_lens)))
    batch = [(s, tokens[s][: scenario.prompt_lens[s]]) for s in prompts]
    for (s, _), out in zip(batch, seqs.step(batch)):
        records.append(Record("prefill", 0, s, 0, out))
    for step in range(1, scenario.decode_steps + 1):
        batch = [(s, [tokens[s][scenario.prompt_lens[s] + step - 1]]) for s in prompts]
        for (s, _), out in zip(batch, seqs.step(batch)):
            records.append(Record("decode", step, s, seqs.lens[s] - 1, out))
    chunked, decoding = len(tokens) - 1, 1 % len(prompts)
    start = 0
    for i, size in enumerate(scenario.chunks):
        pos = seqs.lens[decoding]
        batch = [
            (chunked, tokens[chunked][start : start + size]),
            (decoding, [tokens[decoding][pos]]),
        ]
        outs = seqs.step(batch)
        records.append(Record("chunked", i, chunked, start, outs[0]))
        records.append(Record("chunked", i, decoding, pos, outs[1]))
        start += size
    return records


def hf_reference(hf_model, tokens: list[list[int]], device="cpu") -> list[Any]:
    """HF logits [len, vocab] (float32, CPU) of every whole sequence, one at a time."""
    import torch

    out = []
    with torch.inference_mode():
        for toks in tokens:
            ids = torch.tensor([toks], device=device)
            out.append(hf_model(input_ids=ids).logits[0].float().cpu())
    return out


def compare(arch: str, records: list[Record], reference: list[Any]) -> ParityReport:
    report = ParityReport(arch)
    decode: dict[int, float] = {}
    for r in records:
        ref = reference[r.seq][r.start : r.start + r.logits.shape[0]]
        if ref.shape != r.logits.shape:
            raise ValueError(
                f"{arch}: logits {tuple(r.logits.shape)} vs reference {tuple(ref.shape)}"
            )
        diff = (r.logits - ref).abs().max().item()
        if r.phase == "prefill":
            report.prefill = max(report.prefill, diff)
        elif r.phase == "decode":
            decode[r.step] = max(decode.get(r.step, 0.0), diff)
        else:
            report.chunked = max(report.chunked, diff)
    report.decode = [decode[k] for k in sorted(decode)]
    return report


def verify_model_dir(
    model_dir: Path,
    dtype: str = "float32",
    decode_steps: int = 8,
    seed: int = 0,
    *,
    model_class: type | None = None,
    trust_remote_code: bool = False,
) -> ParityReport:
    """`hf2paged verify`: HF eager vs the generated model on random prompts.

    `model_class`: the generated class (default: the registry's). A checkpoint that does
    not fit the model (a missing weight, a wrong shape) fails with the generated
    `load_weights`' own one-line error, the one `generate` gives, whichever of the two
    loaders meets it first. `trust_remote_code` lets transformers run a model
    directory's own code (its reference model and config).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf2paged.quiet import quiet_transformers
    from runtime.engine.build_model import build_model

    torch_dtype = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"unknown dtype {dtype!r}; expected float32, bfloat16 or float16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if not getattr(config, "architectures", None):
        raise ValueError("config.json names no architectures; cannot pick a generated class")

    def ours():
        return build_model(model_dir, torch_dtype, device, config=config, model_class=model_class)

    try:
        with quiet_transformers():
            hf = AutoModelForCausalLM.from_pretrained(
                model_dir,
                attn_implementation="eager",
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
            )
    except Exception as hf_error:  # noqa: BLE001 — explained by our loader when it can
        ours()  # a checkpoint that does not fit: our loader's one line, as in `generate`
        raise ValueError(f"transformers cannot load the model: {_first_line(hf_error)}") from None
    hf = hf.to(device).eval()
    scenario = Scenario(
        prompt_lens=(7, 16, 3),
        decode_steps=decode_steps,
        chunks=(8, 8, 5),
        block_size=16,
        seed=seed,
    )
    tokens = scenario.tokens(min(config.vocab_size, 32000))
    reference = hf_reference(hf, tokens, device)
    del hf
    model = ours()
    records = run_generated(model, tokens, scenario, device, torch_dtype)
    return compare(config.architectures[0], records, reference)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
