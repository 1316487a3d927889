"""Pairs from real searches: "this is the one" clicks, appended to the index's pairs file.

Each click is one JSON Lines record in the format `grape_cli.pairs.load_pairs` reads:

    {"query": "夕阳下的猫", "target": "/photos/cat.jpg"}
    {"query": "but in red", "target": "/photos/b.jpg", "image": "/photos/a.jpg"}

`image` is there when the query had a reference image (a composed query). Target paths
are absolute, as the index stores them, so the file can be read from anywhere.

Writers never corrupt the file, whether they are threads of one server or several
processes: each record is written with one `write` on an `O_APPEND` descriptor while
holding an exclusive `flock` on it, so lines never interleave.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from grape_cli.errors import InputError

PAIRS_FILE = "pairs.jsonl"


def pairs_file(index_dir: str | Path) -> Path:
    """The pairs file of an index: where `grape serve` appends, and `grape train` reads."""
    return Path(index_dir) / PAIRS_FILE


def pair_record(query: str, target: str, image: str | None = None) -> dict:
    """The record for one pair, checked; raises InputError for an empty query or target.

    >>> pair_record("  a red cat ", "/p/cat.jpg")
    {'query': 'a red cat', 'target': '/p/cat.jpg'}
    """
    query = (query or "").strip() if isinstance(query, str) else ""
    if not query:
        raise InputError(
            "a pair needs the text query",
            "type a query: a search by image alone has no text to learn from",
        )
    if not isinstance(target, str) or not target:
        raise InputError("a pair needs a target image")
    record = {"query": query, "target": target}
    if image:
        record["image"] = image
    return record


def append_pair(index_dir: str | Path, query: str, target: str, image: str | None = None) -> int:
    """Append one pair to the index's pairs file; returns the number of pairs in it now."""
    record = pair_record(query, target, image)
    try:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") from a JSON body
        raise InputError("the query is not valid Unicode text", "retype it") from None
    path = pairs_file(index_dir)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a hand-edited file without a final newline
        view = memoryview(line)
        while view:  # one write in practice; a short write continues under the same lock
            view = view[os.write(fd, view) :]
        return _count_lines(fd)
    finally:
        os.close(fd)


def count_pairs(index_dir: str | Path) -> int:
    """Non-blank lines of the pairs file, without parsing them (0 if there is none)."""
    try:
        fd = os.open(pairs_file(index_dir), os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        return _count_lines(fd)
    finally:
        os.close(fd)


def _count_lines(fd: int) -> int:
    """Non-blank lines of an open file, read from its start whatever the offset."""
    count, offset, tail = 0, 0, b""
    while chunk := os.pread(fd, 1 << 20, offset):
        offset += len(chunk)
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        count += sum(1 for line in lines if line.strip())
    return count + (1 if tail.strip() else 0)


@dataclass
class PairsInfo:
    path: str
    exists: bool
    pairs: int
    with_image: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def pairs_info(index_dir: str | Path) -> PairsInfo:
    """How many pairs the index's pairs file holds (every line checked by `load_pairs`)."""
    from grape_cli.pairs import load_pairs

    path = pairs_file(Path(index_dir).expanduser().resolve())
    if not path.is_file() or not path.read_bytes().strip():
        return PairsInfo(str(path), path.is_file(), 0, 0)
    pairs = load_pairs(path)
    with_image = 0
    for raw in path.read_text(encoding="utf-8-sig").splitlines():
        if raw.strip() and '"image"' in raw and json.loads(raw).get("image"):
            with_image += 1
    return PairsInfo(str(path), True, len(pairs), with_image)
