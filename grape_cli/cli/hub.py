"""`grape push`: publish a tuned rewriter on the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from grape_cli.cli import app
from grape_cli.cli.render import console, plain, print_json


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


@app.command("push")
def push_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder written by `grape train --out`."),
    repo_id: str = typer.Argument(..., help="Hub repo to push to: owner/name."),
    private: bool = typer.Option(
        False,
        "--private",
        help="Create the repo as private (an existing repo keeps its visibility).",
    ),
    revision: str = typer.Option(
        None, "--revision", help="Branch to push to (created if missing). Default: main."
    ),
    commit_message: str = typer.Option(None, "--commit-message", help="Commit message."),
    dry_run: Path = typer.Option(
        None,
        "--dry-run",
        metavar="DIR",
        help="Write the folder that would be uploaded into DIR (new or empty) and stop.",
    ),
    include_examples: int = typer.Option(
        0,
        "--include-examples",
        min=0,
        help="Publish N example rewrites of held-out queries in the card and grape.json "
        "(off by default: no query text leaves the machine).",
    ),
    examples_from: Path = typer.Option(
        None, "--examples-from", help="Pairs file to take the example queries from."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Publish a tuned rewriter: safetensors weights, tokenizer, grape.json and a model card.

    One commit; the repo is created if needed. The token comes from HF_TOKEN or
    `hf auth login` and is never printed. Nothing from your photos or pairs is uploaded:
    local paths are removed, and query text only goes with --include-examples.
    """
    from grape_cli.hub import push_rewriter

    result = push_rewriter(
        run_dir,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        dry_run=dry_run,
        include_examples=include_examples,
        examples_from=examples_from,
    )
    if json_out:
        print_json(result.to_dict())
        return
    title = Text.assemble(
        "dry run: " if result.dry_run else "pushed to ",
        plain(result.folder if result.dry_run else result.repo_id),
    )
    table = Table(title=title, title_justify="left")
    table.add_column("file")
    table.add_column("size", justify="right")
    for path, size in result.files:
        table.add_row(plain(path), _size(size))
    table.add_row(f"[bold]{len(result.files)} files[/]", f"[bold]{_size(result.total_bytes)}[/]")
    console.print(table)
    if result.dry_run:
        console.print(
            Text.assemble(
                "nothing uploaded; `grape push ",
                plain(f"{run_dir} {repo_id}"),
                "` uploads this folder",
            )
        )
        return
    for path in result.deleted:
        console.print(plain(f"removed stale {path}", "dim"))
    spec = f"{repo_id}@{revision}" if revision and revision != "main" else repo_id
    console.print(Text.assemble("commit: ", plain(result.url or result.commit)))
    console.print(Text.assemble("use it: grape search QUERY --rewriter ", plain(spec)))
