"""`grape serve` and `grape pairs`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from grape_cli.cli import app
from grape_cli.cli.render import console, err_console, print_json

INDEX_HELP = "Index folder. Default: $GRAPE_INDEX, else $GRAPE_HOME/index."


@app.command("serve")
def serve_cmd(
    index: Path = typer.Option(None, "--index", envvar="GRAPE_INDEX", help=INDEX_HELP),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to listen on. Loopback (the default) is reachable from this machine "
        "only; any other address requires a token.",
    ),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port (0: any free port)."),
    rewriter: list[str] = typer.Option(
        [],
        "--rewriter",
        "-r",
        help="A rewriter to offer besides none: zero-shot, a Hub id or folder of a causal LM, "
        "or a folder written by `grape train`. Repeatable; the last one is preselected. "
        "Default: the index's rewriters (`grape rewriters`), its default preselected.",
    ),
    token: str = typer.Option(
        None,
        "--token",
        envvar="GRAPE_TOKEN",
        help="Require this token (16+ characters) on every request. Default: none on "
        "loopback; off loopback one is generated and printed once.",
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow a rewriter's own Python code (trusted only)."
    ),
    device: str = typer.Option(None, "--device", help="cuda, cuda:1, mps or cpu (default: best)."),
    threads: int = typer.Option(
        None,
        "--threads",
        min=1,
        help="CPU threads (default: the cores other processes leave idle).",
    ),
) -> None:
    """Serve a search page and a JSON API on this index, with the models loaded once.

    Open the printed URL in a browser:
    - type a query in any language, pick a rewriter, see the rewrite and thumbnails;
    - click a photo to search by it, or keep it as a reference and type an edit;
    - press "this is the one" on the right result: the (query, image) pair goes
      into the index's pairs.jsonl, for grape train (count it with grape pairs).

    While it runs, grape search on the same index asks it (same output, no model
    loading). JSON API: GET /api/search?q=..&k=..&rewriter=..&image_id=..,
    /api/health, /api/rewriters, /api/image/ID; POST /api/pairs. Ctrl-C stops it.
    """
    from grape_cli import serve

    token, generated = serve.resolve_token(host, token)
    serve.check_no_server(index)
    sock = serve.bind(host, port)  # a busy port fails now, not after loading the models
    if rewriter:
        from grape_cli.cli.search import _quiet_transformers

        _quiet_transformers(rewriter)
    err_console.print("loading the index and models…", highlight=False)
    service = serve.Service(
        index, rewriter, device=device, threads=threads, trust_remote_code=trust_remote_code
    )
    server = serve.GrapeServer(service, host, port, token, sock=sock)
    url = server.url
    if host in ("0.0.0.0", "::"):  # every interface: the machine's name is what others type
        import socket

        url = f"http://{socket.gethostname()}:{server.port}"
    if token and generated:
        url += f"/?token={token}"
    console.print(
        f"[bold]grape serve[/]: {escape(url)}\n"
        f"  index {escape(str(service.root))}: {service.size:,} images, {escape(service.store.model)}"
        f"\n  rewriters: {escape(', '.join(r.label for r in service.rewriters))}",
        highlight=False,
        soft_wrap=True,
    )
    if generated:
        console.print(
            f"  [bold yellow]token[/] (printed only now): {token}\n"
            "  send it as `Authorization: Bearer TOKEN`; the URL above carries it for a browser",
            highlight=False,
            soft_wrap=True,
        )
    elif token:
        console.print("  every request needs the token you gave (--token)", highlight=False)
    console.print("  Ctrl-C to stop", style="dim", highlight=False)
    server.serve_forever()
    err_console.print("grape serve: stopped", highlight=False)


@app.command("pairs")
def pairs_cmd(
    index: Path = typer.Option(None, "--index", envvar="GRAPE_INDEX", help=INDEX_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the count and path as JSON."),
) -> None:
    """How many (query, image) pairs "this is the one" has recorded, and where.

    grape serve appends them to the index's pairs.jsonl, one JSON object a line,
    in the format grape eval and grape train read.
    """
    from grape_cli.feedback import pairs_info
    from grape_cli.store import Store, default_index_dir

    root = Path(index or default_index_dir()).expanduser().resolve()
    Store.read_manifest(root)
    info = pairs_info(root)
    if json_out:
        print_json(info.to_dict())
        return
    composed = f" ({info.with_image} with a reference image)" if info.with_image else ""
    console.print(f"{info.pairs} pair(s){composed} in {escape(info.path)}", highlight=False)
    if not info.exists:
        console.print(
            '[dim]none yet: run `grape serve` and press "this is the one" on a result[/]',
            highlight=False,
        )
