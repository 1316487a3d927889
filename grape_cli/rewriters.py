"""An index's rewriters: the runs `grape train` keeps with it, and which one is its default.

Runs live in `<index>/rewriters/NAME/`; the default is named in `<index>/rewriters/default`
(one line: a run's name, or absent for none). `grape search` and `grape eval` use the
default when no `--rewriter` is given, so `grape index`, `grape train`, `grape search`
work as a three-command flow. Reading the default imports nothing heavy: a cold search
without a rewriter must stay fast.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from grape_cli.errors import IndexMismatch, UsageError

RUNS = "rewriters"
DEFAULT_FILE = "default"


@dataclass
class RewriterEntry:
    name: str
    path: str
    base_model: str
    reward: str
    recall_at_1: float | None
    recall_at_10: float | None
    created: str
    retriever: str
    default: bool = False


def runs_dir(index_root: str | Path) -> Path:
    return Path(index_root).expanduser().resolve() / RUNS


def default_name(index_root: str | Path) -> str | None:
    """The name of the index's default rewriter, or None."""
    try:
        name = (runs_dir(index_root) / DEFAULT_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return name if name and (runs_dir(index_root) / name).is_dir() else None


def default_spec(index_root: str | Path) -> str | None:
    """The folder of the index's default rewriter (a `--rewriter` spec), or None."""
    name = default_name(index_root)
    return str(runs_dir(index_root) / name) if name else None


def list_rewriters(index_root: str | Path) -> list[RewriterEntry]:
    """Every finished run kept with the index, oldest first."""
    from grape_cli.errors import GrapeError
    from grape_cli.runfolder import RunInfo, is_run_folder

    folder, default = runs_dir(index_root), default_name(index_root)
    out = []
    for run in sorted(p for p in folder.glob("*") if p.is_dir() and not p.name.startswith(".")):
        if not is_run_folder(run):
            continue
        try:
            info = RunInfo.read(run)
        except GrapeError:
            continue  # a damaged run is not offered; `grape rewriters rm` still removes it
        tuned = info.metrics.get("tuned") or {}
        out.append(
            RewriterEntry(
                name=run.name,
                path=str(run),
                base_model=info.base_model,
                reward=info.reward,
                recall_at_1=tuned.get("recall@1"),
                recall_at_10=tuned.get("recall@10"),
                created=info.created,
                retriever=info.retriever_spec,
                default=run.name == default,
            )
        )
    return sorted(out, key=lambda e: e.created)


def use(index_root: str | Path, name: str | None) -> None:
    """Make `name` the index's default rewriter (None or 'none': no default)."""
    folder = runs_dir(index_root)
    if name is None or name.strip().lower() == "none":
        (folder / DEFAULT_FILE).unlink(missing_ok=True)
        return
    _check_name(index_root, name)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (DEFAULT_FILE + ".tmp")
    tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(tmp, folder / DEFAULT_FILE)


def remove(index_root: str | Path, name: str) -> bool:
    """Delete a kept run; returns whether it was the default (which then becomes none)."""
    _check_name(index_root, name)
    was_default = default_name(index_root) == name
    if was_default:
        use(index_root, None)
    shutil.rmtree(runs_dir(index_root) / name)
    return was_default


def promote_if_better(index_root: str | Path, run: str | Path, metrics: dict) -> bool:
    """Make `run` the default when it is kept with the index and its held-out Recall@10
    beats the current default's (or there is none). Returns whether it did."""
    run = Path(run).resolve()
    if run.parent != runs_dir(index_root):
        return False  # a run kept elsewhere (`--out`) is used by naming it
    current = next((e for e in list_rewriters(index_root) if e.default), None)
    score = metrics.get("recall@10")
    if score is None:
        return False
    if current is not None and (current.recall_at_10 or 0.0) >= score:
        return False
    use(index_root, run.name)
    return True


def resolve(index_root: str | Path, spec: str | None, retriever: str) -> tuple[str, bool]:
    """(the rewriter spec to use, whether it is the index's default). An explicit spec
    wins; else the default, refused if it was tuned for another retriever."""
    if spec:
        return spec, False
    name = default_name(index_root)
    if name is None:
        return "none", False
    from grape_cli.models import canonical_clip_spec
    from grape_cli.runfolder import RunInfo

    info = RunInfo.read(runs_dir(index_root) / name)
    try:
        same = canonical_clip_spec(info.retriever_spec) == canonical_clip_spec(retriever)
    except Exception:  # an odd spec: compare the text
        same = info.retriever_spec == retriever
    if not same:
        raise IndexMismatch(
            f"the index's default rewriter {name} was tuned for {info.retriever_spec}, "
            f"but the index uses {retriever}",
            "pass --rewriter none, or `grape rewriters use none`, or train one for this index",
        )
    return str(runs_dir(index_root) / name), True


def _check_name(index_root, name: str) -> None:
    names = [e.name for e in list_rewriters(index_root)]
    if name not in names and not (runs_dir(index_root) / name).is_dir():
        raise UsageError(
            f"the index has no rewriter named {name!r}",
            f"its rewriters: {', '.join(names) or 'none yet (train one with `grape train`)'}",
        )
    if "/" in name or name.startswith("."):
        raise UsageError(f"{name!r} is not a rewriter name", "use a name from `grape rewriters`")
