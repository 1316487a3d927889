"""`grape index` and `grape info`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from grape_cli.cli import app
from grape_cli.cli.progress import progress_for
from grape_cli.cli.render import console, err_console, plain, print_json
from grape_cli.embed import DECODE_TIMEOUT_S

INDEX_HELP = "Index folder. Default: $GRAPE_INDEX, else $GRAPE_HOME/index."


@app.command("index")
def index_cmd(
    paths: list[Path] = typer.Argument(..., help="Folders of images (searched recursively)."),
    index: Path = typer.Option(None, "--index", envvar="GRAPE_INDEX", help=INDEX_HELP),
    model: str = typer.Option(
        None,
        "--model",
        help="open_clip model: ARCH:TAG (default ViT-B-32:laion2b_s34b_b79k "
        "for a new index), hf-hub:org/repo, or a local open_clip folder. An existing index "
        "keeps its own model.",
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per model batch."),
    workers: int = typer.Option(
        None,
        "--workers",
        min=0,
        help="Decoding processes (default: number of CPUs, max 8); --engine ray uses the "
        "cluster's CPUs instead.",
    ),
    exclude: list[str] = typer.Option(
        [], "--exclude", help="Glob to skip (name or relative path); repeatable."
    ),
    keep_missing: bool = typer.Option(
        False, "--keep-missing", help="Keep rows of files no longer on disk."
    ),
    device: str = typer.Option(None, "--device", help="cuda, cuda:1, mps or cpu (default: best)."),
    precision: str = typer.Option(
        None, "--precision", help="fp32, fp16 or bf16 (default: fp16 on GPU, fp32 on CPU)."
    ),
    decode_timeout: float = typer.Option(
        DECODE_TIMEOUT_S,
        "--decode-timeout",
        min=0.0,
        help="Seconds one file may take to read and decode before it is skipped (0: no "
        "limit). Like other bad files, it is retried once it changes.",
    ),
    engine: str = typer.Option(
        "local",
        "--engine",
        help="local: this machine. ray: decode, embed and write on a Ray cluster (the "
        "folders, the model and the index at the same paths on every node).",
    ),
    ray_address: str = typer.Option(
        None,
        "--ray-address",
        help="With --engine ray: auto (this machine's cluster) or HOST:PORT. Default: "
        "$RAY_ADDRESS, else a cluster started for this run on this machine.",
    ),
    ann_threshold: int = typer.Option(
        None,
        "--ann-threshold",
        min=0,
        help="Build an approximate (ANN) index for `grape search` once the index holds at "
        "least N images (default 1,000,000). Kept for later runs.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    # Hidden: rows per LanceDB commit; tests lower it to kill a run between commits.
    commit_every: int = typer.Option(512, "--commit-every", min=1, hidden=True),
) -> None:
    """Embed the images under PATHS into the index; re-run any time to pick up changes.

    Unchanged files (same path, size and mtime) are skipped, changed ones re-embedded,
    deleted ones removed, and moved or renamed ones reuse their stored embedding. Bad
    files are skipped and listed with the reason. Safe to interrupt: re-run to resume.
    """
    from grape_cli.index import index_folders

    with progress_for("img", enabled=not json_out) as progress:
        summary = index_folders(
            paths,
            index,
            model,
            batch_size=batch_size,
            workers=workers,
            exclude=exclude,
            keep_missing=keep_missing,
            device=device,
            precision=precision,
            commit_every=commit_every,
            progress=progress,
            decode_timeout=decode_timeout or None,
            engine=engine,
            ray_address=ray_address,
            ann_threshold=ann_threshold,
        )
    for repair in summary.repaired:
        err_console.print(
            Text.assemble(("repaired", "yellow"), ": ", plain(repair)), soft_wrap=True
        )
    if json_out:
        print_json(summary.to_dict())
        return
    _print_summary(summary)


def _print_summary(summary) -> None:
    title = Text.assemble("grape index: ", plain(summary.index))
    table = Table(title=title, show_header=False, title_justify="left")
    for name in ("added", "updated", "moved", "removed", "unchanged"):
        table.add_row(name, str(getattr(summary, name)))
    table.add_row("failed", str(len(summary.failed)))
    table.add_row("time", f"{summary.seconds:.1f} s")
    table.add_row("speed", f"{summary.images_per_s:.1f} images/s ({summary.encoded} embedded)")
    if summary.ann and summary.ann.get("state") in ("built", "current", "failed"):
        table.add_row("ANN index", _ann_line(summary.ann))
    console.print(table)
    if summary.failed:
        console.print(f"[yellow]{len(summary.failed)} file(s) skipped:[/]")
        for f in summary.failed[:20]:
            line = Text.assemble("  ", plain(f["path"]), ": ", plain(f["reason"]))
            if not f["new"]:
                line.append(" (unchanged since it failed; not retried)", style="dim")
            console.print(line, soft_wrap=True)  # long paths stay whole, for copying
        if len(summary.failed) > 20:
            console.print(f"  ... and {len(summary.failed) - 20} more (see --json)")


def _ann_line(ann: dict) -> str:
    """
    >>> _ann_line({"state": "built", "kind": "IVF1024,Flat", "nprobe": 64, "build_s": 71.0})
    'built: IVF1024,Flat, nprobe 64 (71 s)'
    """
    if ann["state"] == "failed":
        return "failed: searches are exact"
    took = f" ({ann['build_s']:.0f} s)" if "build_s" in ann and ann["state"] == "built" else ""
    return f"{ann['state']}: {ann.get('kind')}, nprobe {ann.get('nprobe')}{took}"


@app.command("info")
def info_cmd(
    index: Path = typer.Option(None, "--index", envvar="GRAPE_INDEX", help=INDEX_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show an index: model, dimension, images, roots, failures, size on disk."""
    from grape_cli.index import index_info

    info = index_info(index)
    if json_out:
        print_json(info)
        return
    title = Text.assemble("grape index ", plain(info["index"]))
    table = Table(show_header=False, title=title, title_justify="left")
    table.add_column()
    table.add_column(overflow="fold")  # paths whole, over several lines if need be
    for key in ("model", "dim", "schema_version", "images", "failures", "created", "updated"):
        table.add_row(key, plain(info[key]))
    table.add_row("roots", Text("\n").join(plain(r) for r in info["roots"]) or "-")
    table.add_row("size on disk", f"{info['size_bytes'] / 1e6:.1f} MB")
    ann = info.get("ann")
    table.add_row(
        "ANN index",
        f"{ann['kind']}, nprobe {ann['nprobe']}"
        if ann
        else f"none (from {info['ann_threshold']:,} images)",
    )
    console.print(table)
