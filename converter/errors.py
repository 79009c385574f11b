"""The one error type the converter raises: a single line a user can act on."""

from __future__ import annotations

from pathlib import Path


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


class ConversionError(Exception):
    """``file:line: construct — what to do``. The CLI prints ``str(err)`` and exits 2."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        construct: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = str(path) if path is not None else None
        self.line = line
        self.construct = construct
        self.hint = hint
        self.message = message
        super().__init__(self.format())

    def format(self) -> str:
        where = self.path or "<input>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        # one line whatever the pieces hold (an exception's text may span several)
        text = f"{where}: {_one_line(self.message)}"
        if self.construct:
            construct = " ".join(self.construct.split())
            if len(construct) > 80:
                construct = construct[:77] + "..."
            text += f" [`{construct}`]"
        if self.hint:
            text += f" — {_one_line(self.hint)}"
        return text


class InternalConversionError(ConversionError):
    """A converter bug met on this input (an exception no pass anticipated), reported
    as one line naming the stage and the source line (see `converter.guard`)."""
