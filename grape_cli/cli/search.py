"""`grape search` and `grape eval`."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from grape_cli.cli import app
from grape_cli.cli.progress import progress_for
from grape_cli.cli.render import console, err_console, plain, print_json
from grape_cli.errors import InputError

INDEX_HELP = "Index folder. Default: $GRAPE_INDEX, else $GRAPE_HOME/index."
REWRITER_HELP = (
    "none (the query as is), zero-shot (Qwen/Qwen2.5-0.5B-Instruct), a Hub id or folder of "
    "a causal LM, or a folder written by `grape train`."
)
PROMPT_HELP = (
    'Prompt for a zero-shot rewriter: JSON {"system": ..., "user": "...{query}..."} or plain '
    "text used as the user message. A tuned rewriter keeps the prompt it was trained on."
)


def _end_process() -> None:
    """End a read-only command now. Interpreter teardown of torch, torchvision and LanceDB
    took 1.5-3 s here (benchmarks/search_latency.py), longer than the search itself, and
    there is nothing left to write. Only in the `grape` program, never in-process (tests)."""
    import grape_cli.cli as cli

    if cli.PROGRAM:
        import logging
        import os
        import sys

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _prompt(path: Path | None):
    if path is None:
        return None
    from grape_cli.prompt import PromptTemplate

    if not path.exists():
        raise InputError(f"--prompt-file {path} does not exist", "check the path")
    return PromptTemplate.from_file(path)


@app.command("search")
def search_cmd(
    query: str = typer.Argument(None, help="What you are looking for, in any language and length."),
    index: Path = typer.Option(None, "--index", envvar="GRAPE_INDEX", help=INDEX_HELP),
    k: int = typer.Option(10, "-k", "--top-k", min=1, help="Number of results."),
    rewriter: str = typer.Option(
        None,
        "--rewriter",
        "-r",
        envvar="GRAPE_REWRITER",
        help=REWRITER_HELP
        + " Default: the index's default rewriter (`grape rewriters`), else none.",
    ),
    rewrites: int = typer.Option(
        1,
        "--rewrites",
        min=1,
        help="Sample N rewrites and fuse their rankings (reciprocal rank fusion).",
    ),
    temperature: float = typer.Option(
        None,
        "--temperature",
        min=0.0,
        help="Sampling temperature (default: greedy for one "
        "rewrite, the model's own setting for several).",
    ),
    image: Path = typer.Option(None, "--image", help="An image as the query, or added to it."),
    image_weight: float = typer.Option(
        1.0, "--image-weight", help="Weight of --image added to the text query's embedding."
    ),
    prompt_file: Path = typer.Option(None, "--prompt-file", help=PROMPT_HELP),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow a rewriter's own Python code (trusted only)."
    ),
    backend: str = typer.Option(
        "auto",
        "--backend",
        help="faiss (grape's ANN index past `grape index --ann-threshold`, else exact, "
        "vectors in memory), lance (LanceDB; its ANN index if the table has one), or auto "
        "(lance only when the table has a LanceDB ANN index, else faiss).",
    ),
    exact: bool = typer.Option(
        False,
        "--exact",
        help="Brute force over every image, even where an approximate (ANN) index would "
        "answer (an index past `grape index --ann-threshold`, or a LanceDB ANN index).",
    ),
    device: str = typer.Option(None, "--device", help="cuda, cuda:1, mps or cpu (default: best)."),
    threads: int = typer.Option(
        None,
        "--threads",
        min=1,
        help="CPU threads (default: the cores other processes leave idle).",
    ),
    seed: int = typer.Option(None, "--seed", help="Seed for sampled rewrites."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    html: Path = typer.Option(
        None, "--html", help="Also write a self-contained HTML page with thumbnails."
    ),
    timings: bool = typer.Option(False, "--timings", hidden=True, help="Print stage timings."),
) -> None:
    """Search the indexed photos; shows what the rewriter turned the query into."""
    from grape_cli.quick import quick_search
    from grape_cli.remote import search_via_server

    options = {
        "rewriter": rewriter,
        "rewrites": rewrites,
        "image": image,
        "image_weight": image_weight,
        "temperature": temperature,
        "device": device,
        "prompt": _prompt(prompt_file),
        "trust_remote_code": trust_remote_code,
        "backend": backend,
        "threads": threads,
        "seed": seed,
        "exact": exact,
    }
    # Warm path: a running `grape serve` of this index answers when it supports the options
    # (grape_cli/remote.py). Then a text query without a rewriter is answered from the
    # index's search cache without torch (grape_cli/quick.py). Else the full path.
    result = search_via_server(query, index, k, **options)
    if result is None and _no_rewriter(rewriter, index) and rewrites == 1 and seed is None:
        result = quick_search(
            query, index, k, rewriter="none", image=image, backend=backend, device=device,
            prompt=prompt_file, threads=threads, exact=exact,
        )  # fmt: skip
    if result is None:
        from grape_cli.search import search

        _quiet_transformers([rewriter or "default"])
        result = search(query, index, k, **options)
    output_started = time.perf_counter()
    if html is not None:
        from grape_cli.html import write_html

        written = write_html(result, html)
    if json_out:
        print_json(result.to_dict())
    else:
        _render_result(result)
    if html is not None:
        err_console.print(Text.assemble("wrote ", plain(written)))
    if timings:
        output = {"output": time.perf_counter() - output_started}  # rendering, for benchmarks
        err_console.print(
            "  ".join(
                f"{name} {sec * 1000:.0f} ms" for name, sec in {**result.timings, **output}.items()
            )
        )
    _end_process()


def _render_result(result) -> None:
    """The human output of a search: the rewriter used, query, rewrites, hits."""
    if result.rewriter_default:
        err_console.print(
            Text.assemble(
                "rewriter: ",
                plain(_display_name(result.rewriter)),
                ", the index's default (--rewriter none to search without it)",
            )
        )
    if result.query:
        console.print(Text.assemble(("query", "bold"), ": ", plain(shorten(result.query))))
    if result.rewriter != "none":
        for i, text in enumerate(result.rewrites, start=1):
            label = f"rewrite {i}" if len(result.rewrites) > 1 else "rewrite"
            console.print(
                Text.assemble(
                    (label, "bold cyan"),
                    " (",
                    plain(_display_name(result.rewriter)),
                    "): ",
                    plain(text),
                )
            )
    if result.image:
        weight = f", weight {result.image_weight:g}" if result.image_weight is not None else ""
        if result.image_weight is None and result.rewrites:  # a VLM wrote the caption from it
            weight = " (read by the rewriter)"
        console.print(Text.assemble(("image", "bold"), ": ", plain(result.image), weight))
    table = Table(title_justify="left", caption_justify="left")
    if not result.exact:  # the hits of an ANN index may miss a better image
        table.caption = "approximate search (--exact: every image)"
    table.add_column("rank", justify="right")
    table.add_column(result.score_kind, justify="right")
    table.add_column("path", overflow="fold")
    for hit in result.hits:
        table.add_row(str(hit.rank), f"{hit.score:.4f}", plain(hit.path))
    console.print(table)


def _no_rewriter(spec: str | None, index: Path | None) -> bool:
    """Whether the search runs without a rewriter: `none` asked for, or nothing asked for
    and the index has no default rewriter (read without heavy imports)."""
    if spec is not None:
        return spec.strip().lower() in ("", "none")
    from grape_cli.rewriters import default_spec
    from grape_cli.store import default_index_dir

    return default_spec(index or default_index_dir()) is None


def shorten(text: str, limit: int = 300) -> str:
    """A long text as its start and its length: a 100,000-character query is not echoed.

    >>> shorten("abcdef", limit=4)
    'abcd… (6 characters)'
    """
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def _cell(value, delta=None, lower_is_better: bool = False, fmt: str = "{:.3f}") -> str:
    if value is None:
        return "-"
    text = fmt.format(value)
    if delta is None:
        return text
    better = delta < 0 if lower_is_better else delta > 0
    style = "green" if better else ("red" if delta else "dim")
    return f"{text} [{style}]{'+' if delta >= 0 else ''}{fmt.format(delta)}[/]"


def _display_name(spec: str) -> str:
    """A folder's own name (the full path is in --json); a Hub id as it is."""
    path = Path(spec).expanduser()
    return path.name if spec not in ("none", "zero-shot") and path.is_dir() else spec


def _quiet_transformers(specs: list[str]) -> None:
    """transformers draws a progress bar for every checkpoint it loads: noise here."""
    if any(s not in ("none", "") for s in specs):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@app.command("eval")
def eval_cmd(
    pairs: Path = typer.Argument(
        ...,
        help='JSON Lines {"query": ..., "target": PATH} (or "targets": [...]), or CSV/TSV with '
        "query,target columns. Relative paths are relative to this file.",
    ),
    index: Path = typer.Option(None, "--index", envvar="GRAPE_INDEX", help=INDEX_HELP),
    rewriter: list[str] = typer.Option(
        [],
        "--rewriter",
        "-r",
        help=REWRITER_HELP + " Repeatable; none is always included. Default: the index's "
        "default rewriter, if it has one.",
    ),
    rewrites: int = typer.Option(
        1, "--rewrites", min=1, help="Sample N rewrites per query and fuse their rankings."
    ),
    temperature: float = typer.Option(None, "--temperature", min=0.0, help="Sampling temperature."),
    strict: bool = typer.Option(
        False, "--strict", help="Fail when a target is not in the index (default: skip, listed)."
    ),
    per_query: Path = typer.Option(
        None, "--per-query", help="Write each query, its rewrite(s) and target rank (JSONL)."
    ),
    prompt_file: Path = typer.Option(None, "--prompt-file", help=PROMPT_HELP),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow a rewriter's own Python code (trusted only)."
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Queries per LM batch."),
    device: str = typer.Option(None, "--device", help="cuda, cuda:1, mps or cpu (default: best)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Recall@1/5/10, MRR and median target rank for each rewriter, side by side with none."""
    from grape_cli.evaluate import evaluate
    from grape_cli.pairs import describe_missing

    _quiet_transformers(rewriter or ["default"])
    with progress_for("q", enabled=not json_out) as progress:
        report = evaluate(
            pairs,
            index,
            rewriter,
            device=device,
            strict=strict,
            per_query_path=per_query,
            batch_size=batch_size,
            progress=progress,
            prompt=_prompt(prompt_file),
            trust_remote_code=trust_remote_code,
            rewrites=rewrites,
            temperature=temperature,
        )
    if report.missing:
        err_console.print(
            Text.assemble(
                (f"{len(report.missing)} target(s) not in the index", "yellow"),
                ": ",
                plain(describe_missing(report.missing)),
                f"; {len(report.skipped_lines)} pair(s) with no indexed target skipped "
                "(--strict to fail instead)",
            )
        )
    if json_out:
        print_json(report.to_dict())
        _end_process()
        return
    table = Table(
        title=Text.assemble(
            f"grape eval: {report.n_evaluated} of {report.n_pairs} pairs, ", plain(report.model)
        ),
        title_justify="left",
    )
    table.add_column("rewriter", overflow="fold")
    for name in ("R@1", "R@5", "R@10", "MRR", "median rank", "rewrite ms/q"):
        table.add_column(name, justify="right")
    for row in report.rows:
        m = row.metrics
        d = report.deltas(row) if row.rewriter != "none" else {}
        name = _display_name(row.rewriter)
        name += f" ×{row.rewrites_per_query}" if row.rewrites_per_query > 1 else ""
        table.add_row(
            plain(name),
            *(_cell(m[f"recall@{k}"], d.get(f"recall@{k}")) for k in (1, 5, 10)),
            _cell(m["mrr"], d.get("mrr")),
            _cell(m["median_rank"], d.get("median_rank"), lower_is_better=True, fmt="{:g}"),
            f"{row.rewrite_ms_per_query:.1f}",
        )
    console.print(table)
    for row in report.rows:
        if row.fallbacks:
            err_console.print(
                Text.assemble(
                    plain(row.rewriter, "yellow"),
                    f": {row.fallbacks} empty rewrite(s) replaced by the query itself",
                )
            )
    if report.per_query:
        err_console.print(Text.assemble("per-query results: ", plain(report.per_query)))
    _end_process()
