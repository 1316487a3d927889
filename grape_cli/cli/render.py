"""Rich rendering shared by the commands: consoles, errors, progress bars, JSON."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from grape_cli.errors import GrapeError

# No emoji codes: a file named "a:cat:.jpg" is shown as it is.
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)

# What a terminal would act on rather than show: C0 and C1 controls (ESC starts a colour
# or cursor sequence, and so does the one-byte CSI, \x9b), bidirectional overrides that
# reorder the text around them, and lone surrogates (undecodable bytes) that cannot be
# written out at all.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(m: re.Match) -> str:
    char = m.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def plain(value: object, style: str = "", keep_newlines: bool = False) -> Text:
    """A string from the user or the file system, ready to print: never read as Rich
    markup (a file named "bad[/x].png" is not a closing tag), with control characters
    shown as escapes ("\\x1b[31m") instead of sent to the terminal. All CLI output of
    such strings goes through here; combine with Text.assemble or Text.append."""
    text = str(value)
    if keep_newlines:
        return Text("\n").join(plain(line, style) for line in text.split("\n"))
    return Text(_UNSAFE.sub(_visible, text), style=style)


def render_error(e: GrapeError) -> None:
    """The one line (and hint) of a GrapeError; its text names user paths, so it is plain."""
    err_console.print(
        Text.assemble(("error:", "bold red"), " ", plain(e.message, keep_newlines=True)),
        highlight=False,
        soft_wrap=True,
    )
    if e.hint:
        err_console.print(
            Text.assemble("  ", ("hint:", "dim"), " ", plain(e.hint, keep_newlines=True)),
            highlight=False,
            soft_wrap=True,
        )


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


class RichProgress:
    """`grape_cli.index.Progress` as a Rich bar: count, rate and ETA; silent if disabled."""

    def __init__(self, unit: str = "img", enabled: bool = True):
        self._progress = Progress(
            TextColumn("[bold]{task.description:>10}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(unit),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=err_console,
            disable=not enabled,
            transient=False,
        )
        self._task = None

    def __enter__(self) -> RichProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def start(self, total: int, description: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, visible=True)
        self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)
