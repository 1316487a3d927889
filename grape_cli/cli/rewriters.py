"""`grape rewriters`: the rewriters kept with an index, and which one is its default."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from grape_cli.cli import app
from grape_cli.cli.index import INDEX_HELP
from grape_cli.cli.render import console, print_json

rewriters_app = typer.Typer(
    help="The rewriters `grape train` kept with the index, and its default (used by "
    "`grape search` and `grape eval` when no --rewriter is given).",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(rewriters_app, name="rewriters")


def _index(index: Path | None) -> Path:
    from grape_cli.store import Store, default_index_dir

    root = Path(index or default_index_dir()).expanduser().resolve()
    Store.read_manifest(root)  # no index: one clear error
    return root


@rewriters_app.callback()
def rewriters_cmd(
    ctx: typer.Context,
    index: Path = typer.Option(None, "--index", envvar="GRAPE_INDEX", help=INDEX_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List the index's rewriters: name, base model, reward, held-out R@1/R@10, date."""
    ctx.obj = {"index": index}
    if ctx.invoked_subcommand is not None:
        return
    from grape_cli.rewriters import list_rewriters

    entries = list_rewriters(_index(index))
    if json_out:
        print_json([asdict(e) for e in entries])
        return
    if not entries:
        console.print("no rewriters yet: `grape train PAIRS` keeps one with the index")
        return
    table = Table(title_justify="left")
    for name in ("", "name", "base model", "reward", "R@1", "R@10", "created"):
        table.add_column(name, justify="right" if name.startswith("R@") else "left")
    for e in entries:
        table.add_row(
            "*" if e.default else "",
            escape(e.name),
            escape(e.base_model),
            e.reward,
            "-" if e.recall_at_1 is None else f"{e.recall_at_1:.3f}",
            "-" if e.recall_at_10 is None else f"{e.recall_at_10:.3f}",
            e.created,
        )
    console.print(table)
    console.print("* the default: `grape rewriters use NAME|none` changes it", highlight=False)


@rewriters_app.command("use")
def use_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="A rewriter's name, or none."),
    index: Path = typer.Option(None, "--index", envvar="GRAPE_INDEX", help=INDEX_HELP),
) -> None:
    """Make NAME the index's default rewriter (none: search without one by default)."""
    from grape_cli.rewriters import use

    use(_index(index or ctx.obj["index"]), name)
    console.print(f"default rewriter: {escape(name)}", highlight=False)


@rewriters_app.command("rm")
def rm_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The rewriter to delete."),
    index: Path = typer.Option(None, "--index", envvar="GRAPE_INDEX", help=INDEX_HELP),
) -> None:
    """Delete a rewriter kept with the index (if it was the default, the default is none)."""
    from grape_cli.rewriters import remove

    was_default = remove(_index(index or ctx.obj["index"]), name)
    note = "; the index has no default rewriter now" if was_default else ""
    console.print(f"removed {escape(name)}{note}", highlight=False)
