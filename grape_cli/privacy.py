"""The second line of defence of `grape push`: nothing local in what is uploaded.

The first line is `RunInfo.public()`, an allow-list. Here, what is about to be uploaded is
scanned as text: it must hold no local path that the run knows of (its `grape.local.json`,
the run folder, the home folder), no absolute path at all in what grape writes itself,
and no query from the run's pairs files. Saved model configs have their path fields
(`_name_or_path`, ...) cut to bare names first.
"""

from __future__ import annotations

import contextlib
import re
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any

from grape_cli.errors import GrapeError, HubError
from grape_cli.models import local_name

_PATH_FIELDS = re.compile(r"(name_or_path|_path|_dir|_file)$")
# An absolute path with at least two parts, not inside a URL ('https://a/b' or '~/Pictures').
_ABS_PATH = re.compile(r"(?<![\w.:/~])/(?:[^\s/\"'`]+/)+[^\s/\"'`]+|\b[A-Za-z]:\\\\?[^\s\"']+")
# Very short queries ("dog") also occur in ordinary card text; they reveal little.
MIN_QUERY_CHARS = 8


def is_path(s: str) -> bool:
    """An absolute, home-relative or explicitly relative path (one token, no spaces).

    >>> is_path("/home/ann/x"), is_path("./a"), is_path("org/name"), is_path("a b/c")
    (True, True, False, False)
    """
    return (
        2 < len(s) < 4096
        and not re.search(r"\s", s)
        and (
            s.startswith(("/", "~", "./", "../", "local-dir:"))
            or bool(re.match(r"^[A-Za-z]:[\\/]", s))
        )
    )


def scrub_json_paths(value: Any, key: str = "") -> Any:
    """Path fields of a saved config (`_name_or_path`, ...) become bare folder names."""
    if isinstance(value, dict):
        return {k: scrub_json_paths(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_json_paths(v, key) for v in value]
    if isinstance(value, str) and _PATH_FIELDS.search(key) and is_path(value):
        return local_name(value)
    return value


def forbidden_strings(info, run: Path) -> set[str]:
    """Every local path the run knows of, the run folder and the home folder."""
    found = {str(run)}
    for value in asdict(info.local).values():
        if isinstance(value, str) and len(value) > 2:
            found.add(value.rstrip("/\\"))
    home = str(Path.home())
    if len(home) >= 5:
        found.add(home)
    return found


def pair_queries(info, run: Path) -> set[str]:
    """Queries of every pairs file the run names or holds, to check none is published."""
    from grape_cli.pairs import load_pairs

    named = [info.local.pairs, info.local.eval_pairs, *map(str, run.glob("*.jsonl"))]
    queries: set[str] = set()
    for value in filter(None, named):
        if Path(value).is_file():
            with contextlib.suppress(GrapeError):  # not a pairs file after all
                queries |= {p.query.text for p in load_pairs(value)}
    return {q for q in queries if len(q.strip()) >= MIN_QUERY_CHARS}


def privacy_scan(folder: Path, forbidden_paths: set[str], queries: set[str]) -> None:
    """Refuse to publish a file that still holds a local path or a training query."""
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            text = _safetensors_header(f)
        elif f.suffix in {".json", ".md", ".txt", ".jinja", ".model"}:
            text = f.read_text(encoding="utf-8", errors="replace")
        else:
            continue
        found = next((s for s in forbidden_paths if s in text), None)
        if found is None and f.name in {"grape.json", "README.md"}:
            match = _ABS_PATH.search(text)  # what grape wrote itself: no path of any kind
            found = match.group(0) if match else None
        if found:
            raise HubError(
                f"refusing to publish: {f.name} contains the local path {found}",
                "remove it from the run folder's files or prompt, or report a grape bug",
            )
        if f.name in {"grape.json", "README.md"} and any(q in text for q in queries):
            raise HubError(
                f"refusing to publish: {f.name} contains a query from your pairs",
                "remove it from the prompt or settings, or report this as a grape bug",
            )


def _safetensors_header(path: Path) -> str:
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            return ""
        (size,) = struct.unpack("<Q", raw)
        return fh.read(min(size, 100_000_000)).decode("utf-8", errors="replace")
