"""`hf2paged serve`: load a model into the engine and serve the OpenAI API with uvicorn.

Registered in `hf2paged.cli`. Like every command, it
imports the engine, FastAPI and uvicorn inside its body. Bad arguments exit 2 with one
line on stderr, a model that fails to load exits 1.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from hf2paged.options import (
    DTYPES,
    EXPERT_PARALLEL_HELP,
    TRUST_REMOTE_CODE_HELP,
    check_device,
    check_model_dir,
    check_remote_code,
    one_line,
    torch_dtype,
)

LOG_LEVELS = ("debug", "info", "warning", "error")


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def serve(
    model: Annotated[
        Path,
        typer.Argument(
            help="transformers model directory (config.json, weights, tokenizer) or a .gguf file.",
            show_default=False,
        ),
    ],
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port to listen on (0: any free port, printed when ready).")
    ] = 8000,
    tp: Annotated[
        int, typer.Option("--tp", help="Tensor-parallel size (one process per rank).")
    ] = 1,
    expert_parallel: Annotated[
        bool,
        typer.Option(
            "--expert-parallel",
            help=EXPERT_PARALLEL_HELP,
        ),
    ] = False,
    dtype: Annotated[str, typer.Option(help=f"One of {', '.join(DTYPES)}.")] = "auto",
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if present).")
    ] = None,
    max_model_len: Annotated[
        int | None,
        typer.Option(help="Longest prompt + output in tokens (default: the model's context)."),
    ] = None,
    gpu_memory_utilization: Annotated[
        float, typer.Option(help="Share of GPU memory the engine may use (weights + KV cache).")
    ] = 0.9,
    kv_cache_memory_mib: Annotated[
        int | None,
        typer.Option(help="KV-cache size in MiB (default: from --gpu-memory-utilization on GPU)."),
    ] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Most requests in the running batch.")] = 256,
    max_num_batched_tokens: Annotated[
        int | None,
        typer.Option(
            help="Most tokens one engine step runs, prompt chunks and decodes (default: 8192 "
            "on a GPU, 2048 on the CPU; larger: more throughput, longer stalls for streams)."
        ),
    ] = None,
    max_waiting_requests: Annotated[
        int,
        typer.Option(help="Requests that may wait for the batch; beyond, 503 with Retry-After."),
    ] = 1024,
    block_size: Annotated[int, typer.Option(help="Tokens per KV-cache block.")] = 16,
    enable_prefix_caching: Annotated[
        bool, typer.Option(help="Reuse the KV blocks of prompt prefixes seen before.")
    ] = False,
    enforce_eager: Annotated[bool, typer.Option(help="No CUDA graphs.")] = False,
    served_model_name: Annotated[
        str | None,
        typer.Option(help="The model name clients send (default: the directory or file name)."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="HF2PAGED_API_KEY",
            help="Require 'Authorization: Bearer KEY' on /v1 routes (or set HF2PAGED_API_KEY).",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)
    ] = False,
) -> None:
    """Serve MODEL over HTTP with the OpenAI API (/v1/completions, /v1/chat/completions).

    Continuous batching across every client; streamed answers are server-sent events; a
    client that disconnects frees its KV blocks at once. /health and /metrics (Prometheus)
    need no API key. A GGUF file is converted once to a cached model directory; a
    directory with its own code (config.json's auto_map) needs --trust-remote-code, and
    its code is then converted once into the per-user cache.
    """
    try:
        check_model_dir(model)
        check_remote_code(model, trust_remote_code)
        dtype_ = torch_dtype(dtype)
        check_device(device)
        _check_options(tp, port, max_waiting_requests, log_level, max_num_batched_tokens)
    except ValueError as err:
        raise _fail(str(err), 2) from None
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from hf2paged.model_source import gguf_of, prepare_model
    from hf2paged.serve.app import ServerConfig, build_app
    from runtime.engine import LLM
    from runtime.engine.async_llm import AsyncLLM
    from runtime.engine.config import default_token_budget, resolve_device
    from runtime.engine.engine_process import EngineProcess

    gguf = gguf_of(model)
    name = served_model_name or (gguf.stem if gguf else model.resolve().name)
    typer.echo(f"loading {model} ...", err=True)
    start = time.perf_counter()
    try:
        # A GGUF file or a directory's own code is converted once into the user cache
        # (progress on stderr).
        source = prepare_model(
            model, trust_remote_code, log=lambda line: typer.echo(line, err=True)
        )
        # The engine steps in a process of its own (which starts the TP ranks); this one
        # serves HTTP.
        make_llm = functools.partial(
            LLM, source.path, tensor_parallel_size=tp, dtype=dtype_, device=device,
            block_size=block_size, trust_remote_code=trust_remote_code,
            model_class=source.model_class, expert_parallel=expert_parallel,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs, enable_prefix_caching=enable_prefix_caching,
            max_num_batched_tokens=max_num_batched_tokens
            or default_token_budget(resolve_device(device).type, serving=True),
            enforce_eager=enforce_eager, max_model_len=max_model_len,
            kv_cache_memory_bytes=None if kv_cache_memory_mib is None else kv_cache_memory_mib << 20,
        )  # fmt: skip
        engine = EngineProcess(make_llm)
    except (ValueError, RuntimeError, OSError) as err:
        raise _fail(one_line(err), 1) from None
    info = engine.info
    typer.echo(
        f"loaded in {time.perf_counter() - start:.1f} s: {info.num_blocks} KV blocks of "
        f"{info.block_size} tokens, context {info.max_model_len} tokens, model name {name!r}",
        err=True,
    )
    try:
        app = build_app(AsyncLLM(engine, max_waiting_requests), ServerConfig(name, api_key))
        _run(app, host, port, log_level)
    finally:
        engine.shutdown()


def _check_options(
    tp: int, port: int, max_waiting: int, log_level: str, token_budget: int | None = None
) -> None:
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    if not 0 <= port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    if max_waiting < 1:
        raise ValueError(f"--max-waiting-requests must be >= 1, got {max_waiting}")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"--max-num-batched-tokens must be >= 1, got {token_budget}")
    if log_level not in LOG_LEVELS:
        raise ValueError(f"--log-level {log_level!r}; expected one of {', '.join(LOG_LEVELS)}")


def _run(app, host: str, port: int, log_level: str) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and self.servers:
                bound = self.servers[0].sockets[0].getsockname()
                shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
                print(f"hf2paged serve: ready at http://{shown}:{bound[1]}", flush=True)

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
        access_log=log_level == "debug",
    )  # fmt: skip
    Server(config).run()
