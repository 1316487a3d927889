"""Where a run is built and what it logs.

A run is built in a hidden sibling folder `.NAME.partial/` (TRL checkpoints,
`metrics.jsonl`, `state.json`, `best-STEP/`) and the finished folder is renamed into
place in one step: the run folder either does not exist or is complete. A resumed run
continues the partial folder from TRL's last complete checkpoint, and its
`metrics.jsonl` is cut back to that step first, so every step appears once, in order,
however often the run was killed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grape_cli.errors import UsageError
from grape_cli.rewriters import runs_dir

STATE = "state.json"
METRICS = "metrics.jsonl"
BEST = "best.json"


@dataclass
class RunDirs:
    out: Path  # the finished folder (renamed into place at the end)
    work: Path  # the partial folder everything is built in

    @property
    def checkpoints(self) -> Path:
        return self.work / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.work / METRICS


def run_dirs(out: str | Path | None, resume: bool, index_root: Path, check: bool = True) -> RunDirs:
    """The run's folders; `out=None` is a new dated run under the index (or, with
    `resume`, its latest unfinished one). `check=False` (a training process other than
    the main one) takes the folders as named, since the main process prepares them."""
    runs = runs_dir(index_root)
    if out is None and resume:
        partials = sorted(runs.glob(".*.partial"), key=lambda p: p.stat().st_mtime)
        if not partials:
            raise UsageError(f"`resume`: no unfinished run under {runs}", "name the run's `out`")
        out = runs / partials[-1].name[1 : -len(".partial")]
    out = Path(out or runs / time.strftime("%Y%m%d-%H%M%S")).expanduser().resolve()
    work = out.parent / f".{out.name}.partial"
    if not check:
        return RunDirs(out, work)
    if out.exists():
        raise UsageError(
            f"run folder {out} already exists" + (" (that run finished)" if resume else ""),
            "pass another `out`, or delete it",
        )
    if resume and not (work / STATE).is_file():
        raise UsageError(f"`resume`: no unfinished run for {out}", "leave out `resume` to start it")
    if not resume and work.exists() and not (work / STATE).is_file():
        shutil.rmtree(work)  # a start that failed before its state was written: nothing to keep
    if not resume and work.exists():
        raise UsageError(
            f"an unfinished run for {out} is in {work}",
            "continue it with `resume`, or delete that folder to start over",
        )
    return RunDirs(out, work)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    os.replace(tmp, path)  # readers never see half a file


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that finished saving (TRL writes trainer_state.json last)."""
    if not folder.is_dir():
        return None
    done = [
        p
        for p in folder.glob("checkpoint-*")
        if (p / "trainer_state.json").is_file() and p.name[11:].isdigit()
    ]
    return max(done, key=lambda p: int(p.name[11:]), default=None)


def checkpoint_step(checkpoint: Path | None) -> int:
    return int(checkpoint.name[11:]) if checkpoint is not None else 0


def read_rows(path: Path, upto: int | None = None) -> list[dict]:
    """metrics.jsonl's rows, one per step in step order (a later row of a step replaces an
    earlier one; a line cut short by a kill is skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:  # not written yet, or moved into the finished run folder
        return []
    by_step: dict[int, dict] = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step) if upto is None or s <= upto]


def rewind(run: RunDirs, step: int) -> dict | None:
    """Forget everything logged after `step` (the checkpoint a resumed run restarts from):
    metrics rows and a best checkpoint chosen later. Returns the best that still holds."""
    rows = read_rows(run.metrics, upto=step)
    tmp = run.metrics.with_name(METRICS + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, run.metrics)
    best = read_json(run.work / BEST)
    if not best or best["step"] <= step:
        return best
    # The best was chosen after the checkpoint: fall back to the one before it, which
    # `save_best` keeps on disk for exactly this case.
    shutil.rmtree(run.work / best["dir"], ignore_errors=True)
    previous = best.get("previous")
    if previous and previous["step"] <= step and (run.work / previous["dir"]).is_dir():
        write_json(run.work / BEST, previous)
        return previous
    (run.work / BEST).unlink()
    return None


def save_best(run: RunDirs, model, tokenizer, step: int, metrics: dict, best: dict | None) -> dict:
    """Save the new best weights, switch best.json to them in one write, and keep the
    previous best until then (a resume from an earlier checkpoint may need it)."""
    tmp = run.work / f"best-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    final = run.work / f"best-{step}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    previous = {k: v for k, v in best.items() if k != "previous"} if best else None
    new = {"step": step, "dir": final.name, "metrics": metrics, "previous": previous}
    write_json(run.work / BEST, new)  # the switch is this one write
    keep = {final.name, previous["dir"] if previous else None}
    for old in run.work.glob("best-*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return new
