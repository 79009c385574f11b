"""`LLM`: the engine's front door — load a model directory, take requests, generate."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from pathlib import Path

from runtime.engine.block_manager import BlockManager
from runtime.engine.config import (
    EngineConfig,
    default_token_budget,
    model_context_length,
    resolve_device,
    resolve_dtype,
)
from runtime.engine.detokenizer import IncrementalDetokenizer
from runtime.engine.loading import (
    CheckedRequest,
    RequestChecker,
    check_model,
    eos_token_ids,
    load_tokenizer,
)
from runtime.engine.outputs import RequestOutput, TokenDelta
from runtime.engine.sampler import Sampler, SamplerOutput
from runtime.engine.sampling_params import SamplingParams
from runtime.engine.scheduler import Scheduler, SchedulerOutput
from runtime.engine.sequence import Sequence, SequenceStatus
from runtime.engine.step_inputs import prepare_step

Prompt = str | list[int]


@dataclass
class _Launched:
    """A step on its way through the device: what was scheduled, who samples, and the
    samples (device tensors, copying to the host)."""

    out: SchedulerOutput
    sampling: list[Sequence]
    sampled: SamplerOutput | None
    # Some sampling sequence's next step needs these tokens on the host (penalties).
    needs_history: bool

    def rows(self) -> dict[int, int]:
        """Sequence id -> its row of the sampled ids."""
        return {seq.seq_id: i for i, seq in enumerate(self.sampling)}


class LLM:
    """Continuous-batching inference over a generated model on the paged runtime.

    ``LLM(model_dir).generate(prompts, SamplingParams(...))`` for batches;
    `stream` for one prompt's text as it is produced; `add_request` / `step` /
    `abort_request` for servers and tests. Bad requests raise ValueError before anything
    is scheduled.

    `model_class`: the generated class to serve (default: the registry's class for the
    config's architecture); it must be importable by name in spawned TP ranks.
    `trust_remote_code`: lets transformers run the directory's own configuration and
    tokenizer code (never prompting; without it such a directory is a one-line error).
    Converting a directory's own modeling code is the application layer's job
    (`hf2paged.LLM`), which hands the class in.

    `async_scheduling` (default: on for CUDA, off for the CPU, where the host is the
    device and nothing overlaps): each step is scheduled and launched while the one
    before still runs on the device, whose samples feed it on the device; the host learns
    them one step later, so `step()` reports the tokens of the step launched by the call
    before. Tokens are the same either way; a request that stops on EOS or a stop string
    costs one extra step of compute, dropped. Steps that sample with penalties (which
    read every token so far) run synchronously.

    `max_num_batched_tokens`: the most tokens one step runs (prompt chunks and decodes);
    default 16384 on a GPU (throughput; a server passes 8192, see
    `runtime.engine.config.TOKEN_BUDGET_OFFLINE`), 2048 on the CPU.

    `expert_parallel`: with ``tensor_parallel_size > 1``, mixture-of-experts layers hold
    whole experts per rank (experts split evenly) instead of a slice of every expert;
    attention and dense layers stay tensor parallel.
    """

    def __init__(
        self,
        model: str | Path,
        tensor_parallel_size: int = 1,
        dtype=None,
        device=None,
        block_size: int = 16,
        gpu_memory_utilization: float = 0.9,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = False,
        enforce_eager: bool = False,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        *,
        trust_remote_code: bool = False,
        model_class: type | None = None,
        async_scheduling: bool | None = None,
        expert_parallel: bool = False,
    ) -> None:
        from runtime.engine.worker import Executor

        model_dir = Path(model)
        hf_config = check_model(
            model_dir, tensor_parallel_size, trust_remote_code, model_class, expert_parallel
        )
        if block_size < 1 or max_num_seqs < 1:
            raise ValueError(
                f"block_size and max_num_seqs must be >= 1, got {block_size}, {max_num_seqs}"
            )
        device = resolve_device(device)
        context = model_context_length(hf_config) or 2048
        if max_model_len is not None:
            if isinstance(max_model_len, bool) or not isinstance(max_model_len, int):
                raise ValueError(f"max_model_len must be an int, got {max_model_len!r}")
            if not 2 <= max_model_len <= context:
                raise ValueError(
                    f"max_model_len must be in [2, {context}] (the model's context length), "
                    f"got {max_model_len}"
                )
            context = max_model_len
        if max_num_batched_tokens is None:
            max_num_batched_tokens = default_token_budget(device.type)
        self.config = EngineConfig(
            model=model_dir,
            tensor_parallel_size=tensor_parallel_size,
            dtype=resolve_dtype(dtype, hf_config, device),
            device_type=device.type,
            block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=context,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            trust_remote_code=trust_remote_code,
            model_class=model_class,
            expert_parallel=expert_parallel,
        )
        self.hf_config = hf_config
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code)
        self.eos_token_ids = eos_token_ids(model_dir, hf_config, self.tokenizer)
        self.vocab_size = hf_config.get_text_config().vocab_size
        self.executor = Executor(self.config)
        num_blocks = self.executor.num_blocks
        # A request must fit the cache alone, or preemption could not make room for it.
        self.max_model_len = min(context, num_blocks * block_size)
        self.block_manager = BlockManager(
            num_blocks, block_size, enable_prefix_caching, -(-self.max_model_len // block_size)
        )
        self.checker = RequestChecker(
            model_dir, self.tokenizer, self.vocab_size, self.max_model_len,
            f"model {context}, KV cache {num_blocks * block_size}",
        )  # fmt: skip
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.sampler = Sampler()
        if async_scheduling is None:
            async_scheduling = device.type == "cuda"
        self.async_scheduling = bool(async_scheduling)
        self._launched: _Launched | None = None  # the step in flight (async scheduling)
        self._requests: dict[str, Sequence] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests
    def check_request(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> CheckedRequest:
        """Validate and tokenize a request without queueing it (ValueError when bad). It
        touches only the tokenizer and fixed settings (`self.checker`), so a front end may
        call it on its own thread while another thread steps; `add_checked_request` then
        queues it."""
        return self.checker.check(prompt, sampling_params)

    def add_checked_request(
        self, request: CheckedRequest, request_id: str | None = None, detokenize: bool = True
    ) -> str:
        """`add_request` for a request `check_request` already validated."""
        return self._add(request, request_id, detokenize)

    def _add(
        self, request: CheckedRequest, request_id: str | None, incremental: bool = True
    ) -> str:
        seq_id = next(self._ids)
        request_id = str(seq_id) if request_id is None else request_id
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = request.sampling_params
        seq = Sequence(
            seq_id, request.prompt_token_ids, params, self.config.block_size,
            request_id=request_id, prompt=request.prompt, eos_token_id=self.eos_token_ids,
            max_model_len=self.max_model_len,
        )  # fmt: skip
        # Detokenizing every step costs two tokenizer calls per token; without a stop
        # string or a reader of partial text, the text is decoded once at the end.
        if self.tokenizer is not None and (incremental or params.stop_strings):
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop_strings)
        self._requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def add_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        detokenize: bool = True,
    ) -> str:
        """Queue one request (text or token ids); returns its id. With
        ``detokenize=False`` the text of `step()`'s outputs stays empty until the request
        finishes (then decoded once) unless stop strings need it: for token-id readers."""
        return self._add(self.check_request(prompt, sampling_params), request_id, detokenize)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its KV blocks are freed at once. Unknown ids are ignored."""
        seq = self._requests.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.abort(seq)

    def abort_all(self) -> list[str]:
        """Abort every unfinished request (their blocks are freed); returns their ids."""
        request_ids = list(self._requests)
        for request_id in request_ids:
            self.abort_request(request_id)
        return request_ids

    def has_unfinished_requests(self) -> bool:
        # A step in flight matters only for its unfinished sequences, which the scheduler
        # holds (running, or waiting after a preemption).
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the requests that produced a token."""
        return [self._output(seq) for seq in self._step()]

    def step_tokens(self) -> list[TokenDelta]:
        """Run one engine step; report each request that produced a token by that token
        alone (O(1) per request, where `step` copies every output so far): for front ends
        that stream, and detokenize and match stop strings themselves."""
        return [
            TokenDelta(
                seq.request_id,
                seq.token_ids[-1],
                seq.logprobs[-1] if seq.sampling_params.logprobs is not None else None,
                seq.finish_reason,
                seq.num_output_tokens,
            )  # fmt: skip
            for seq in self._step()
        ]

    def _step(self) -> list[Sequence]:
        """Schedule and launch a step, and take the results of one: under asynchronous
        scheduling those of the step launched by the call before (this one stays in flight),
        else its own. Returns the sequences that got a token."""
        done = self._launched
        self._launched = None
        if done is None or not done.needs_history:
            out = self.scheduler.schedule()
            if not out.is_empty:
                try:
                    self._launched = self._launch(out, done)
                except BaseException:  # incl. KeyboardInterrupt: the engine stays consistent
                    self.scheduler.recover(out)
                    self._launched = done  # its results are still to come
                    raise
        # else: the next step needs these results on the host first (penalties)
        if not self.async_scheduling:
            done, self._launched = self._launched, None
        grown = self._finish(done) if done is not None else []
        if self._launched is not None and not self.scheduler.has_unfinished():
            # Every sequence of the step in flight finished meanwhile (a stop at the step
            # before): its tokens are dropped. Take it now, not at the next request's step.
            stale, self._launched = self._launched, None
            self._finish(stale)
        return grown

    def _launch(self, out: SchedulerOutput, before: _Launched | None) -> _Launched:
        """Prepare and run the step of `out` up to its samples, without waiting for the
        device. `before`: the step in flight, whose samples are this one's pending ids."""
        sampling = out.sampled_seqs()
        rows = before.rows() if before is not None and before.sampling else None
        inputs = prepare_step(out, self.block_manager, rows)
        logits = self.executor.execute(inputs)
        sampled = None
        if sampling:
            try:
                sampled = self.sampler.sample(logits, sampling)
            finally:  # on failure too: TP ranks wait for the sampled ids
                self.executor.keep_sampled(
                    None if sampled is None else sampled.token_ids, len(sampling)
                )
            sampled.start_copy()
        needs_history = any(s.sampling_params.needs_history for s in sampling)
        return _Launched(out, sampling, sampled, needs_history)

    def _finish(self, done: _Launched) -> list[Sequence]:
        """Take a launched step's results on the host: tokens, stops, text."""
        sampling = done.sampling
        tokens, logprobs = [], None
        if done.sampled is not None:
            try:
                tokens, logprobs = done.sampled.tolists()
            except BaseException:  # the device failed: nothing launched can be trusted
                if self._launched is not None:
                    self.scheduler.recover(self._launched.out)
                    self._launched = None
                self.scheduler.recover(done.out)
                raise
        grown = self.scheduler.update(done.out, tokens)
        if len(grown) < len(sampling):  # some finished before their sample arrived
            index = {id(seq): i for i, seq in enumerate(sampling)}
            positions = [index[id(seq)] for seq in grown]
        else:
            positions = range(len(sampling))
        for i, seq in zip(positions, grown):
            if logprobs is not None and logprobs[i] is not None:
                seq.logprobs.append(logprobs[i])
            detok = seq.detokenizer
            if detok is not None:
                if detok.add_token(tokens[i]) and not seq.is_finished:
                    self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
                if seq.is_finished:
                    detok.flush()
            if seq.is_finished:
                self._requests.pop(seq.request_id, None)
        return grown

    def _output(self, seq: Sequence) -> RequestOutput:
        if seq.detokenizer is not None:
            text = seq.detokenizer.text
        elif self.tokenizer is not None and seq.is_finished:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        else:
            text = ""
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            text=text,
            token_ids=seq.output_token_ids,
            finish_reason=seq.finish_reason,
            logprobs=list(seq.logprobs) if seq.sampling_params.logprobs is not None else None,
        )

    # ------------------------------------------------------------------ front ends
    def generate(
        self,
        prompts: Prompt | SequenceABC[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling_params for {len(prompts)} prompts")
        checked = [
            self.check_request(p, sp) for p, sp in zip(prompts, sampling_params)
        ]  # all, first
        seqs = [self._requests[self._add(c, None, incremental=False)] for c in checked]
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(seqs), desc="generate", unit="req", dynamic_ncols=True)
        ours = {s.seq_id for s in seqs}
        remaining = len(seqs)
        try:
            while remaining and self.has_unfinished_requests():
                finished = sum(s.is_finished and s.seq_id in ours for s in self._step())
                remaining -= finished
                if bar is not None and finished:
                    bar.update(finished)
        finally:
            if bar is not None:
                bar.close()
            for s in seqs:  # interrupted (KeyboardInterrupt): leave nothing half-done
                if not s.is_finished:
                    self.abort_request(s.request_id)
        return [self._output(s) for s in seqs]

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[str]:
        """The text of one request as it is produced (deltas; their concatenation is the
        final text). Closing the iterator early aborts the request."""
        if self.tokenizer is None:
            raise ValueError(f"{self.config.model} has no tokenizer; streaming text needs one")
        # Checked and queued now, not at the first next(): bad requests fail here.
        seq = self._requests[self.add_request(prompt, sampling_params)]
        return self._stream(seq)

    def _stream(self, seq: Sequence) -> Iterator[str]:
        try:
            while not seq.is_finished:
                self._step()
                delta = seq.detokenizer.stream_delta(seq.is_finished)
                if delta:
                    yield delta
        finally:
            if not seq.is_finished:
                self.abort_request(seq.request_id)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a chat (`[{"role": ..., "content": ...}]`), ready for the
        assistant's answer, per the tokenizer's chat template."""
        return self.checker.chat_prompt(messages)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop tensor-parallel workers (no-op at TP=1)."""
        executor = self.__dict__.pop("executor", None)
        if executor is not None:
            executor.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 — interpreter shutdown
            pass
