"""The index's vectors where a cold search loads them without LanceDB: a float32 .npy
matrix and a JSON file of the rows' paths and sizes, in the index's search cache.

A cache, never the truth. `write` runs at the end of `grape index` (under the writer
lock) and records the images table's version token (`store.images_version`); `load`
answers None, and the caller takes the LanceDB path, whenever the files are missing,
unreadable or made from another version of the table. Each write puts its data in new
files and then replaces the small pointer file `vectors.json` atomically, so a reader
never pairs one write's matrix with another's paths.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from grape_cli.store import VECTOR_CACHE, images_version, search_cache_dir

if TYPE_CHECKING:
    import numpy as np

    from grape_cli.store import Store

FORMAT = 1
PREFIXES = ("vectors-", "rows-")


@dataclass
class CachedVectors:
    matrix: np.ndarray  # float32, rows x dim, L2-normalised
    paths: list[str]
    sizes: list[tuple[int, int]]  # (width, height) of each row


def write(store: Store) -> bool:
    """Write the cache of `store`'s images table, replacing any earlier one; False (and
    no cache) when the table has an ANN index (which `grape search` uses instead of exact
    search) or its versions cannot be told apart."""
    import numpy as np

    folder = search_cache_dir(store.root)
    clear(store.root)
    if _has_vector_index(store):
        return False
    version = images_version(store.root)
    if version is None:
        return False
    meta, matrix = store.load_matrix(("path", "width", "height"))
    if images_version(store.root) != version:  # changed while reading: never pair them
        return False
    folder.mkdir(exist_ok=True)
    token = secrets.token_hex(6)
    matrix_name, rows_name = f"vectors-{token}.npy", f"rows-{token}.json"
    with open(folder / matrix_name, "wb") as f:
        np.save(f, np.ascontiguousarray(matrix, dtype=np.float32), allow_pickle=False)
    rows = {"path": meta["path"], "width": meta["width"], "height": meta["height"]}
    (folder / rows_name).write_text(json.dumps(rows, ensure_ascii=False), "utf-8")
    pointer = {
        "format": FORMAT,
        "model": store.model,
        "dim": store.dim,
        "count": int(matrix.shape[0]),
        "table_version": version,
        "matrix": matrix_name,
        "matrix_bytes": (folder / matrix_name).stat().st_size,
        "rows": rows_name,
    }
    _write_atomic(folder / VECTOR_CACHE, json.dumps(pointer))
    return True


def load(root: Path, manifest: dict, mmap: bool = False) -> CachedVectors | None:
    """The cached vectors of the index at `root`, or None if they are missing, stale or
    damaged in any way (the caller then reads LanceDB). `mmap`: the matrix memory-mapped,
    for a caller that reads little of it (an ANN search) or reads it once (a build)."""
    try:
        return _load(Path(root), manifest, mmap)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def count(root: Path, manifest: dict) -> int | None:
    """Rows in the current cache (from its pointer alone), or None when it is not current."""
    try:
        pointer = _current_pointer(Path(root), manifest)
        return None if pointer is None else int(pointer["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_current(root: Path, manifest: dict) -> bool:
    """Whether the pointer matches the table, without reading the data (for `grape index`)."""
    try:
        return _current_pointer(Path(root), manifest) is not None
    except (OSError, ValueError, KeyError, TypeError):
        return False


def clear(root: Path) -> None:
    """Invalidate, then remove, the cached vectors."""
    folder = search_cache_dir(root)
    (folder / VECTOR_CACHE).unlink(missing_ok=True)
    if folder.is_dir():
        _remove_unreferenced(folder, set())


def _current_pointer(root: Path, manifest: dict) -> dict | None:
    folder = search_cache_dir(root)
    pointer = json.loads((folder / VECTOR_CACHE).read_text("utf-8"))
    if (
        pointer.get("format") != FORMAT
        or pointer.get("model") != manifest.get("model")
        or pointer.get("dim") != manifest.get("dim")
        or pointer.get("table_version") != images_version(root)
        or pointer.get("table_version") is None
    ):
        return None
    return pointer


def _load(root: Path, manifest: dict, mmap: bool = False) -> CachedVectors | None:
    import numpy as np

    pointer = _current_pointer(root, manifest)
    if pointer is None:
        return None
    folder = search_cache_dir(root)
    n, dim = pointer["count"], pointer["dim"]
    matrix_path = folder / pointer["matrix"]
    if matrix_path.stat().st_size != pointer["matrix_bytes"]:
        return None
    matrix = np.load(matrix_path, allow_pickle=False, mmap_mode="r" if mmap else None)
    rows = json.loads((folder / pointer["rows"]).read_text("utf-8"))
    paths, widths, heights = rows["path"], rows["width"], rows["height"]
    if matrix.dtype != np.float32 or matrix.shape != (n, dim):
        return None
    if not len(paths) == len(widths) == len(heights) == n:
        return None
    return CachedVectors(matrix, paths, list(zip(widths, heights, strict=True)))


def _has_vector_index(store: Store) -> bool:
    try:
        return any("vector" in (ix.columns or []) for ix in store.images.list_indices())
    except Exception:  # cannot tell: no cache, search decides as before
        return True


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, "utf-8")
    os.replace(tmp, path)


def _remove_unreferenced(folder: Path, keep: set[str]) -> None:
    """Data files of earlier writes (a reader that still holds one falls back)."""
    for path in folder.iterdir():
        if path.name.startswith(PREFIXES) and path.name not in keep:
            path.unlink(missing_ok=True)
