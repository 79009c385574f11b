"""`Sampler`: next tokens for a batch of sequences, on the logits' device.

Processing follows transformers' order: repetition penalty (and OpenAI's presence and
frequency penalties, as vLLM applies them), then (non-greedy rows) temperature, top-k,
top-p, min-p, then an exponential race (``argmax(p / q)`` with
``q ~ Exp(1)`` is a sample from ``p``; it needs no cumulative sum and no host sync).
Greedy rows (temperature 0) take the argmax of the penalised logits. Rows with a seed
draw their noise from their own `torch.Generator`, one draw per sampled token, so their
tokens do not depend on the rest of the batch or on preemption.

`Sampler.sample` never waits for the device: its per-row settings go up from pinned
memory without a sync, and it returns the sampled ids (and logprobs) as device tensors
in a `SamplerOutput`, whose `start_copy` / `tolists` bring them to the host with one
wait, when the engine needs them (a step later, under asynchronous scheduling).
"""

from __future__ import annotations

import torch

from runtime.engine.sequence import Sequence

Logprobs = tuple[float, dict[int, float]]


def host_tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values)`` on `device` without waiting for it: on CUDA through
    pinned memory and a non-blocking copy (a copy from pageable memory would sync)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class SamplerOutput:
    """One step's sampled ids (``[N]`` int64) and, when some row asked, their logprobs,
    on the logits' device until `tolists`."""

    def __init__(
        self,
        token_ids: torch.Tensor,  # [N] int64
        logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        num_logprobs: list[int | None] | None = None,  # per row; None: not asked
    ) -> None:
        # logprobs: the sampled token's [N], and the top-k ids [N, k] and values [N, k]
        self.token_ids = token_ids
        self.logprobs = logprobs
        self.num_logprobs = num_logprobs
        self._host: list[torch.Tensor] | None = None
        self._event = None

    def start_copy(self) -> None:
        """Start copying the results to the host (CUDA: pinned memory, non-blocking, an
        event to wait on). On the CPU they already are there."""
        tensors = [self.token_ids] + list(self.logprobs or ())
        if self.token_ids.device.type != "cuda":
            self._host = tensors
            return
        host = []
        for t in tensors:
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            host.append(h)
        self._event = torch.cuda.Event()
        self._event.record()
        self._host = host

    def tolists(self) -> tuple[list[int], list[Logprobs | None] | None]:
        """Token ids and per-row logprobs as Python values (waits for the copy once)."""
        if self._host is None:
            self.start_copy()
        if self._event is not None:
            self._event.synchronize()
        tokens = self._host[0].tolist()
        if self.logprobs is None:
            return tokens, None
        chosen, top_ids, top_vals = (t.tolist() for t in self._host[1:])
        out: list[Logprobs | None] = []
        for i, n in enumerate(self.num_logprobs):
            if n is None:
                out.append(None)
            else:
                out.append((chosen[i], dict(zip(top_ids[i][:n], top_vals[i][:n])) if n else {}))
        return tokens, out


def apply_repetition_penalty(
    logits: torch.Tensor,  # [B, V] fp32, modified in place
    seqs: list[Sequence],
    penalties: list[float],
) -> None:
    """transformers' rule on every token seen so far (prompt and output): positive logits
    are divided by the penalty, negative ones multiplied."""
    rows = [i for i, p in enumerate(penalties) if p != 1.0]
    vocab = logits.shape[1]
    row_idx, tok_idx = [], []
    for i in rows:
        seen = set(seqs[i].token_ids)
        row_idx.extend([i] * len(seen))
        tok_idx.extend(seen)
    device = logits.device
    r = host_tensor(row_idx, torch.long, device)  # [S]
    t = host_tensor(tok_idx, torch.long, device).clamp_(max=vocab - 1)  # [S]
    p = host_tensor(penalties, logits.dtype, device)[r]  # [S]
    seen_logits = logits[r, t]  # [S]
    logits[r, t] = torch.where(seen_logits > 0, seen_logits / p, seen_logits * p)


def apply_frequency_presence_penalties(
    logits: torch.Tensor,  # [B, V] fp32, modified in place
    seqs: list[Sequence],
    frequency: list[float],
    presence: list[float],
) -> None:
    """OpenAI's penalties on the tokens each row has generated so far (not the prompt):
    ``logit -= frequency * count + presence * (count > 0)``."""
    rows = [i for i in range(len(seqs)) if frequency[i] != 0 or presence[i] != 0]
    outputs = [seqs[i].output_token_ids for i in rows]
    longest = max((len(o) for o in outputs), default=0)
    if longest == 0:
        return
    device, vocab = logits.device, logits.shape[1]
    # Padded with `vocab`: an extra column that is counted, then dropped.
    padded = [o + [vocab] * (longest - len(o)) for o in outputs]
    tokens = host_tensor(padded, torch.long, device).clamp_(max=vocab)  # [R, L]
    counts = torch.zeros(len(rows), vocab + 1, dtype=logits.dtype, device=device)  # [R, V+1]
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=logits.dtype))
    counts = counts[:, :vocab]  # [R, V]
    freq = host_tensor([frequency[i] for i in rows], logits.dtype, device)  # [R]
    pres = host_tensor([presence[i] for i in rows], logits.dtype, device)  # [R]
    penalty = freq[:, None] * counts + pres[:, None] * (counts > 0).to(logits.dtype)  # [R, V]
    r = host_tensor(rows, torch.long, device)  # [R]
    logits.index_put_((r,), logits[r] - penalty)


def apply_top_k_top_p(
    logits: torch.Tensor,  # [B, V] fp32, temperature already applied
    top_k: torch.Tensor | None,  # [B] int64, V where off
    top_p: torch.Tensor | None,  # [B] fp32, 1.0 where off
) -> torch.Tensor:  # [B, V], filtered tokens at -inf
    """Keep each row's `top_k` largest logits, then the smallest set whose probability
    reaches `top_p` (the most likely token always stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    vocab = logits.shape[1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]  # [1, V]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        drop |= ranks >= top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)  # [B, V]
        before = probs.cumsum(dim=-1) - probs  # probability mass ranked above each token
        drop |= before >= top_p[:, None]
        drop[:, 0] = False
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


class Sampler:
    """Samples one token per row of logits; see the module docstring for the order."""

    def __call__(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],  # logits [B, V]
    ) -> tuple[list[int], list[Logprobs | None] | None]:
        """`sample`, then wait for the results on the host."""
        return self.sample(logits, seqs).tolists()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:  # [B, V]
        """The next token of every row, left on the device (nothing waits for it)."""
        assert logits.shape[0] == len(seqs), "one row of logits per sequence"
        params = [s.sampling_params for s in seqs]
        if not any(s.sampling_params.needs_processing for s in seqs):
            # The usual greedy batch: argmax in the model's dtype (upcasting is exact, so
            # the choice is the same) without a [B, V] fp32 copy.
            return SamplerOutput(logits.argmax(dim=-1))
        logits = logits.float()  # [B, V]
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
        penalties = [p.repetition_penalty for p in params]
        frequency = [p.frequency_penalty for p in params]
        presence = [p.presence_penalty for p in params]
        repetition = any(p != 1.0 for p in penalties)
        openai = any(f != 0 for f in frequency) or any(p != 0 for p in presence)
        if repetition or openai:
            logits = logits.clone()  # the raw logits may be the model's output buffer
        if repetition:
            apply_repetition_penalty(logits, seqs, penalties)
        if openai:
            apply_frequency_presence_penalties(logits, seqs, frequency, presence)

        if all(p.temperature == 0 for p in params):
            tokens = logits.argmax(dim=-1)  # [B]
        else:
            tokens = self._sample(logits, seqs)
        if raw_logprobs is None:
            return SamplerOutput(tokens)
        k = min(max(p.logprobs or 0 for p in params), raw_logprobs.shape[1])
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)  # [B]
        top_vals, top_ids = raw_logprobs.topk(k, dim=-1)  # [B, k]
        return SamplerOutput(tokens, (chosen, top_ids, top_vals), [p.logprobs for p in params])

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:  # [B]
        params = [s.sampling_params for s in seqs]
        device, vocab = logits.device, logits.shape[1]
        greedy = host_tensor([p.temperature == 0 for p in params], torch.bool, device)  # [B]
        greedy_tokens = logits.argmax(dim=-1)  # [B]
        temps = host_tensor(
            [p.temperature if p.temperature > 0 else 1.0 for p in params], logits.dtype, device
        )
        logits = logits / temps[:, None]  # [B, V]
        top_k = top_p = None
        if any(p.top_k != -1 and p.top_k < vocab for p in params):
            top_k = host_tensor(
                [min(p.top_k, vocab) if p.top_k != -1 else vocab for p in params], torch.long,
                device,
            )  # fmt: skip
        if any(p.top_p < 1.0 for p in params):
            top_p = host_tensor([p.top_p for p in params], logits.dtype, device)
        if top_k is not None or top_p is not None:
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(dim=-1)  # [B, V]
        if any(p.min_p > 0 for p in params):
            min_p = host_tensor([p.min_p for p in params], probs.dtype, device)
            cutoff = probs.amax(dim=-1, keepdim=True) * min_p[:, None]  # [B, 1]
            probs = probs.masked_fill(probs < cutoff, 0.0)
        noise = torch.empty_like(probs).exponential_()  # [B, V]
        for i, seq in enumerate(seqs):
            p = params[i]
            if p.seed is not None and p.temperature > 0:
                noise[i].exponential_(generator=self._generator(seq, device))
        sampled = (probs / noise).argmax(dim=-1)  # [B]
        return torch.where(greedy, greedy_tokens, sampled)

    @staticmethod
    def _generator(seq: Sequence, device: torch.device) -> torch.Generator:
        gen = getattr(seq, "generator", None)
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(seq.sampling_params.seed)
            seq.generator = gen
        return gen
