"""Progress wherever grape runs: a Rich bar on a terminal, plain lines elsewhere.

Rich's live bar draws only on a terminal; in a log file, CI or under `nohup` it prints
nothing for the whole of a long run. There, `LineProgress` prints one line to stderr at
a steady interval (and at the start and the end), with the rate and the time left.
"""

from __future__ import annotations

import os
import sys
import time

from grape_cli.cli.render import RichProgress, err_console

# Seconds between plain progress lines; GRAPE_PROGRESS_INTERVAL overrides (tests, CI).
DEFAULT_INTERVAL = 10.0
# What a training step reports, as "label value".
TRAIN_FIELDS = (
    ("reward", "reward", ".3f"),
    ("rank", "rank", ".1f"),
    ("heldout_r10", "held-out R@10", ".2f"),
)


def progress_for(unit: str = "img", enabled: bool = True, train: bool = False):
    """The right progress display for where the output goes."""
    if not err_console.is_terminal:
        return LineProgress(unit)
    if train:
        from grape_cli.cli.train import TrainBar

        return TrainBar(enabled=enabled)
    return RichProgress(unit=unit, enabled=enabled)


def _duration(seconds: float) -> str:
    """
    >>> _duration(42), _duration(125), _duration(3725)
    ('42s', '2m05s', '1h02m')
    """
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LineProgress:
    """`Progress`/`TrainProgress` as plain lines on stderr, one every `interval` seconds."""

    def __init__(self, unit: str = "img", interval: float | None = None, stream=None):
        self.unit = unit
        self.interval = interval if interval is not None else _interval_from_env()
        self.stream = stream or sys.stderr
        self.description, self.total, self.done = "", 0, 0
        self.fields: dict = {}
        self.started = self.last = 0.0
        self.ended = False  # the line of a finished stage is printed once

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.total and exc[0] is None and not self.ended:
            self.ended = True
            self._print()

    def start(self, total: int, description: str) -> None:
        if self.total and not self.ended:
            self._print()  # the stage before this one, as it ended
        self.description, self.total, self.done = description, total, 0
        self.ended = False
        self.started = self.last = time.monotonic()
        self._print()

    def advance(self, n: int) -> None:
        self.done += n
        self._maybe_print()

    def update(self, fields: dict) -> None:
        self.fields.update({k: v for k, v in fields.items() if v is not None})
        self._maybe_print()

    def _maybe_print(self) -> None:
        # A finished stage is printed once, when it is closed (the next stage starts or
        # the run ends), so that its line carries the last step's figures too.
        if self.total and self.done >= self.total:
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.description}: {self.done:,}/{self.total:,} {self.unit}{pct}"]
        parts += [
            f"{label} {self.fields[key]:{fmt}}"
            for key, label, fmt in TRAIN_FIELDS
            if key in self.fields
        ]
        if self.done:
            parts.append(
                f"{rate:,.1f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}"
            )
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.done and self.total > self.done:
            parts.append(f"eta {_duration((self.total - self.done) / rate)}")
        return ", ".join(parts)

    def _print(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()


def _interval_from_env() -> float:
    try:
        return float(os.environ.get("GRAPE_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
