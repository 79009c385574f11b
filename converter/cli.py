"""The `hf2paged` command line (typer).

Conversion commands live here; serving commands (`generate`, `demo`, `bench`) are
registered from `runtime.engine.cli`, imported lazily so `convert`/`check` never pay for
the runtime.

Errors a user can act on (`ConversionError`, bad arguments) print one line on stderr
and exit 2, never a traceback; `HF2PAGED_DEBUG=1` re-raises them for converter work.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from converter.errors import ConversionError

app = typer.Typer(
    name="hf2paged",
    help="Convert transformers modeling files into paged-attention serving modules.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _one_line(target: str, exc: Exception) -> str:
    if isinstance(exc, ConversionError):
        # an error about the target itself (e.g. an unknown model type) names the target
        return str(exc) if exc.path is not None else f"{target}: {str(exc).split(': ', 1)[1]}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{target}: internal converter error {type(exc).__name__}: {first} (HF2PAGED_DEBUG=1 shows the traceback)"


@app.command()
def convert(
    targets: Annotated[
        list[str] | None,
        typer.Argument(
            help="Model types (`opt`, resolved in the installed transformers) or paths to modeling_<type>.py files.",
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
        typer.Option("--out", help="Output directory (default: the project's generated/)."),
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
    """
    from converter.convert import (
        DEFAULT_OUT,
        architectures,
        generate,
        outputs,
        read_tp_plan,
        write_outputs,
    )
    from converter.writer import check_writable_dir

    debug = bool(os.environ.get("HF2PAGED_DEBUG"))
    out_dir = out if out is not None else DEFAULT_OUT
    try:
        names = list(targets or [])
        if all_:
            names += [a for a in architectures() if a not in names]
        if not names:
            raise _fail("name at least one model type or modeling file, or pass --all")
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
                failures.append(_one_line(current, e))
                continue
            done.append(result)
            typer.echo(f"converted {result.name} in {result.seconds:.2f} s", err=True)
    except KeyboardInterrupt:
        # Nothing is written before every conversion is done: the outputs are untouched.
        raise _fail(
            f"interrupted while converting {current} ({len(done)} of {len(names)} converted): "
            "nothing written",
            code=130,
        ) from None
    if stdout:
        for result in done:
            typer.echo(result.text, nl=False)
    elif done:
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
            raise _fail(f"nothing written: {_one_line(str(out_dir), e)}") from None
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


@app.command()
def check(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory of generated modules (default: generated/)."),
    ] = None,
) -> None:
    """Regenerate every architecture in memory and compare with generated/.

    Exit 1 with a unified diff when anything drifted (CI runs this); exit 2 when a
    conversion fails. Warns when the installed transformers differs from the version
    the generated files were made from.
    """
    from converter.convert import (
        DEFAULT_OUT,
        architectures,
        generate,
        header_versions,
        outputs,
        unified_diff,
    )
    from converter.registry import generated_modules
    from converter.resolve import transformers_version

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
    names = sorted(
        set(architectures()) | set(generated_modules(out_dir) if out_dir.is_dir() else {})
    )
    results, failures = [], []
    for name in names:
        try:
            results.append(generate(name))
        except Exception as e:  # noqa: BLE001
            if os.environ.get("HF2PAGED_DEBUG"):
                raise
            failures.append(_one_line(name, e))
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


@app.command()
def verify(
    model_dir: Annotated[
        Path, typer.Argument(help="A HF model directory (config.json + safetensors).")
    ],
    tolerance: Annotated[float, typer.Option(help="Maximum allowed |logit difference|.")] = 1e-3,
    decode_steps: Annotated[int, typer.Option(help="Decode steps through the paged cache.")] = 8,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    seed: Annotated[int, typer.Option(help="Seed of the random prompts.")] = 0,
) -> None:
    """Run HF transformers and the generated model on the same random prompts.

    Prints the max |logit difference| for a mixed-length prefill, each decode step
    through the paged cache and a chunked prefill; exits 1 above --tolerance.
    """
    if not (model_dir / "config.json").is_file():
        raise _fail(f"{model_dir}: no config.json (pass a HF model directory)")
    from converter.parity import verify_model_dir

    try:
        report = verify_model_dir(model_dir, dtype=dtype, decode_steps=decode_steps, seed=seed)
    except (ValueError, ImportError, OSError) as e:
        if os.environ.get("HF2PAGED_DEBUG"):
            raise
        raise _fail(
            f"{model_dir}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        ) from None
    typer.echo(report.format())
    if report.max_diff > tolerance:
        typer.echo(
            f"FAIL: max |logit diff| {report.max_diff:.3g} > tolerance {tolerance:g}", err=True
        )
        raise typer.Exit(1)
    typer.echo(f"OK: max |logit diff| {report.max_diff:.3g} <= {tolerance:g}")


# Commands that never need the runtime: skip importing it (torch costs seconds).
_CONVERTER_ONLY = {"convert", "check"}


# `hf2paged coverage` lives in converter/coverage_cli.py (typer only at import time).
from converter.coverage_cli import coverage as _coverage  # noqa: E402

app.command(name="coverage")(_coverage)


def _register_serving_commands() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in _CONVERTER_ONLY and "--help" not in argv:
        return
    # No fallback: a runtime that fails to import must say so, not make `generate`,
    # `demo` and `bench` vanish as "No such command".
    from runtime.engine.cli import register

    register(app)


_register_serving_commands()


if __name__ == "__main__":
    app()
