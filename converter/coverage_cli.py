"""The `hf2paged coverage` command (registered on the app in converter/cli.py).

Kept apart so `convert`/`check` never import it; heavy imports (torch, transformers)
happen only in the worker processes and in converter.coverage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


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
    from converter.coverage import DEFAULT_REPORT, run_coverage, write_report

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
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    for c in run.classes:
        o = run.outcomes.get(c.model_type)
        if c.scope == "in" and o is not None and not o.parity:
            typer.echo(f"{c.model_type}: {o.stage}: {o.reason}")
    target = out if out is not None else (None if selected else DEFAULT_REPORT)
    if target is not None:
        written = write_report(run, target, update_readme=target == DEFAULT_REPORT)
        typer.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)
    typer.echo(f"{run.summary.line()} ({run.wall_s:.0f} s, {workers} workers)")
