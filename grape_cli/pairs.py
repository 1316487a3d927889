"""Query/target pairs: the user's own ground truth for `grape eval` and `grape train`.

Two formats, chosen by the file's suffix (or, without one, by its first character):

* JSON Lines, one object a line: `{"query": "...", "target": "path"}` or
  `{"query": "...", "targets": ["a.jpg", "b.jpg"]}` when several images are correct.
  A composed query adds `"image": "ref.jpg"`, the reference image (it need not be in
  the index).
* CSV or TSV with a header that has `query` and `target` columns (`targets`, with paths
  separated by `|`, for several correct images), and optionally `image`.

Relative paths are relative to the pairs file, so a folder of photos and its pairs file
can move together. Nothing is dropped silently: a malformed line, or a reference image
that is missing or not a readable image, fails with its line number, a pair repeated on
several lines is counted once and its repeats are reported, and targets missing from the
index are returned for the caller to list.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from grape_cli.errors import InputError
from grape_cli.query import Query

logger = logging.getLogger("grape")

FORMAT_HINT = (
    'one JSON object a line: {"query": "...", "target": "photo.jpg"} '
    '(or "targets": [...]), or a CSV/TSV with query,target columns'
)


@dataclass(frozen=True)
class Pair:
    query: Query
    targets: tuple[str, ...]  # absolute paths (resolved relative to the pairs file)
    line: int  # 1-based line number in the file

    @property
    def key(self) -> tuple:
        """What makes two lines the same pair: query text, reference image, targets."""
        return (self.query.text, self.query.image, tuple(sorted(self.targets)))


@dataclass
class PairsFile:
    pairs: list[Pair]  # each distinct pair once, in file order
    duplicates: dict[int, int] = field(default_factory=dict)  # repeat line -> first line


def load_pairs(path: str | Path) -> list[Pair]:
    """The distinct pairs of a JSONL or CSV/TSV pairs file (see the module docstring);
    repeated pairs are counted once and reported through the `grape` logger."""
    return read_pairs(path).pairs


def read_pairs(path: str | Path) -> PairsFile:
    """Like `load_pairs`, and says which lines repeated an earlier pair."""
    path = Path(path).expanduser()
    text = _read_text(path)
    if not text.strip():
        raise InputError(f"pairs file {path} is empty", FORMAT_HINT)
    base = path.resolve().parent
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".tab") or (
        suffix not in (".jsonl", ".json", ".ndjson") and not text.lstrip().startswith("{")
    ):
        pairs = _read_table(text, path, base, "\t" if suffix in (".tsv", ".tab") else None)
    else:
        pairs = _read_jsonl(text, path, base)
    if not pairs:
        raise InputError(f"pairs file {path} has no pairs", FORMAT_HINT)
    return _dedupe(pairs, path)


def _read_text(path: Path) -> str:
    """The file as text; a byte that is not UTF-8 is reported with its line number."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"pairs file {path} does not exist", FORMAT_HINT) from None
    except IsADirectoryError:
        raise InputError(f"pairs file {path} is a folder", "pass a .jsonl or .csv file") from None
    except OSError as e:
        raise InputError(f"cannot read pairs file {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})",
            "save the pairs file as UTF-8",
        ) from None


def _dedupe(pairs: list[Pair], path: Path) -> PairsFile:
    first: dict[tuple, int] = {}
    out = PairsFile([])
    for pair in pairs:
        if pair.key in first:
            out.duplicates[pair.line] = first[pair.key]
        else:
            first[pair.key] = pair.line
            out.pairs.append(pair)
    if out.duplicates:
        lines = ", ".join(str(n) for n in list(out.duplicates)[:5])
        more = f" and {len(out.duplicates) - 5} more" if len(out.duplicates) > 5 else ""
        logger.warning(
            "%s: %d line(s) repeat an earlier pair and are counted once (lines %s%s)",
            path,
            len(out.duplicates),
            lines,
            more,
        )
    return out


def _kind(value) -> str:
    return {bool: "true/false", int: "a number", float: "a number", list: "a list"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _resolve(base: Path, p: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(p.strip())))


def _make_pair(query, targets, base: Path, where: str, line: int, image=None, key="target") -> Pair:
    if query is None or (isinstance(query, str) and not query.strip()):
        raise InputError(f"{where}: 'query' is missing or empty", FORMAT_HINT)
    if not isinstance(query, str):
        raise InputError(f"{where}: 'query' must be text, not {_kind(query)}", FORMAT_HINT)
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) and t.strip() for t in targets):
        raise InputError(f"{where}: '{key}' must be a path or a non-empty list of paths")
    if not targets:
        raise InputError(f"{where}: '{key}' is an empty list", "name at least one target image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise InputError(f"{where}: 'image' must be the path of a reference image")
    ref = _resolve(base, image) if image else None
    if ref is not None:
        _check_image(ref, where)
    resolved = tuple(_resolve(base, t) for t in targets)
    return Pair(query=Query(query, image=ref), targets=resolved, line=line)


def _check_image(ref: str, where: str) -> None:
    """A reference image that is missing or unreadable fails here, with its line, rather
    than deep inside a search or a training step. Only the header is read (no decode)."""
    if not os.path.isfile(ref):  # a FIFO or device would block Image.open
        if not os.path.exists(ref):
            why = "no such file"
        else:
            why = "a folder, not an image" if os.path.isdir(ref) else "not a regular file"
        raise InputError(f"{where}: reference image {ref}: {why}", "check the 'image' path")
    from PIL import Image

    from grape_cli.embed import describe_error

    try:
        with Image.open(ref):
            pass
    except Exception as e:  # any failure, a decompression bomb included, is one line
        raise InputError(
            f"{where}: reference image {ref} is not a readable image: {describe_error(e)}",
            "check the 'image' path, or re-save the image as JPEG or PNG",
        ) from None


def _read_jsonl(text: str, path: Path, base: Path) -> list[Pair]:
    pairs = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})", FORMAT_HINT) from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object", FORMAT_HINT)
        if ("target" in obj) == ("targets" in obj):
            raise InputError(f"{where}: give exactly one of 'target' or 'targets'", FORMAT_HINT)
        key = "target" if "target" in obj else "targets"
        pairs.append(_make_pair(obj.get("query"), obj[key], base, where, n, obj.get("image"), key))
    return pairs


def _read_table(text: str, path: Path, base: Path, delimiter: str | None) -> list[Pair]:
    lines = text.splitlines(keepends=True)
    if delimiter is None:
        delimiter = "\t" if "\t" in lines[0] else ","
    reader = csv.reader(lines, delimiter=delimiter)
    header = [h.strip().lower() for h in next(reader)]
    target_col = "target" if "target" in header else "targets"
    if "query" not in header or target_col not in header:
        raise InputError(
            f"{path}:1: the header needs 'query' and 'target' columns, found {header}",
            FORMAT_HINT,
        )
    qi, ti = header.index("query"), header.index(target_col)
    ii = header.index("image") if "image" in header else None
    pairs = []
    start = reader.line_num + 1
    for row in reader:
        line, start = start, reader.line_num + 1  # a quoted field may span several lines
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}:{line}"
        if len(row) != len(header):
            raise InputError(
                f"{where}: {len(row)} fields, the header has {len(header)}",
                "quote fields that contain the separator",
            )
        targets = row[ti].split("|") if target_col == "targets" else row[ti]
        image = row[ii].strip() or None if ii is not None else None
        pairs.append(_make_pair(row[qi], targets, base, where, line, image, target_col))
    return pairs


def match_targets(
    pairs: list[Pair], index_paths: list[str], strict: bool = False
) -> tuple[list[tuple[Pair, list[int]]], list[str]]:
    """Map each pair's targets to row positions in `index_paths`.

    Returns (pairs with at least one indexed target and their row positions, target paths
    not in the index, each once). A pair whose targets are all missing is left out of the
    first list; its paths are in the second. `strict=True` raises instead.
    """
    rows = {p: i for i, p in enumerate(index_paths)}
    matched: list[tuple[Pair, list[int]]] = []
    missing: dict[str, None] = {}  # ordered set
    for pair in pairs:
        found = []
        for target in pair.targets:
            row = rows.get(target)
            if row is None:  # the index stores real paths; the pairs file may use a link
                row = rows.get(os.path.realpath(target))
            if row is None:
                missing[target] = None
            else:
                found.append(row)
        if found:
            matched.append((pair, found))
    missing_list = list(missing)
    if strict and missing_list:
        raise InputError(
            f"{len(missing_list)} target(s) are not in the index: {describe_missing(missing_list)}",
            "index them with `grape index`, fix the paths, or leave out --strict to skip them",
        )
    return matched, missing_list


def describe_missing(paths: list[str], first: int = 3) -> str:
    """'a.jpg, b.jpg, c.jpg and 4 more'

    >>> describe_missing(["a", "b"], first=1)
    'a and 1 more'
    """
    shown = ", ".join(paths[:first])
    return shown + (f" and {len(paths) - first} more" if len(paths) > first else "")
