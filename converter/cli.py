"""The `hf2paged` command line (typer).

Conversion commands live here; serving commands (`generate`, `demo`, `bench`) are
registered from `runtime.engine.cli`, imported lazily so `convert`/`check` never pay for
the runtime.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="hf2paged",
    help="Convert transformers modeling files into paged-attention serving modules.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_serving_commands() -> None:
    try:
        from runtime.engine.cli import register
    except ImportError:  # engine not built yet in this checkout
        return
    register(app)


_register_serving_commands()
