"""The thin command-line layer: parse, call one library function, render with Rich.

`GrapeGroup.invoke` is the one place where a `GrapeError` becomes a line on stderr and
an exit code; library code never exits the process.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from grape_cli.cli.render import err_console, render_error
from grape_cli.errors import GrapeError


class GrapeGroup(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GrapeError as e:
            render_error(e)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print(
                "[yellow]interrupted[/]: work committed so far is kept; "
                "run the same command again to continue"
            )
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=GrapeGroup,
    name="grape",
    help="Search your photos with CLIP in any language or length: an LLM rewrites the query "
    "for the retriever, tuned with GRPO on your own corpus (GRAPE, arXiv 2509.23370).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)

# Each module registers its commands on `app`.
from grape_cli.cli import hub as _hub  # noqa: E402, F401
from grape_cli.cli import index as _index  # noqa: E402, F401
from grape_cli.cli import rewriters as _rewriters  # noqa: E402, F401
from grape_cli.cli import search as _search  # noqa: E402, F401
from grape_cli.cli import serve as _serve  # noqa: E402, F401
from grape_cli.cli import train as _train  # noqa: E402, F401

# Set by main(): True in the `grape` program, False when tests invoke `app` in-process.
PROGRAM = False


def main() -> None:
    global PROGRAM
    PROGRAM = True
    import logging

    from rich.logging import RichHandler

    # Library modules warn through logging.getLogger("grape"); shown on stderr, one line each.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_time=False, show_path=False)],
    )
    app(prog_name="grape")
