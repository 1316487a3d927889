"""The approximate (ANN) index grape keeps beside the exact vectors of a large index.

Exact search reads every vector for every query: about 0.2 s a query over 1,000,000
images on one core, and 2 GB held in memory. Past a size the user sets (`grape index
--ann-threshold N`, kept in the manifest as `ann_threshold`, default 1,000,000 images),
`grape index` ends by building a faiss IVF-Flat index of the table's vectors into the
search cache, and `grape search` answers from it: 13-22 ms a query at a million images
on one busy core, recall@10 against exact search 0.999 (benchmarks/ann_search.py, and
the README, have the measurement behind the choice of IVF-Flat over IVF-SQ8/PQ, HNSW
and LanceDB's IVF-PQ).

Why IVF-Flat: it keeps the full vectors, so every score it returns is the exact cosine
(ranks follow `grape_cli.ranking`'s tie rule on exact scores, as they do for exact
search); its file can be memory-mapped, so a cold `grape search` opens it in
milliseconds and reads only the lists it probes; and it builds in about 2 minutes for a
million vectors on 2 cores, where HNSW took over 10 (it is rebuilt after every change).

`nprobe` (how many of the `nlist` lists a query reads) is not guessed: the build
calibrates it on the corpus itself, against exact search, for pseudo-queries that sit
between two images (harder than the images themselves, and than the text-like queries
of the benchmark), takes the smallest power of two that reaches `CALIBRATION_RECALL`,
and doubles it for queries further from every image than those.

Like the rest of the search cache it is derived, never the truth. The pointer
`ann.json` records the table version it was built from and a digest of the rows' paths
in order (its row numbers are positions in the table); any write to the table removes
the pointer (`Store._drop_snapshot`), and `load` answers None, with a debug log, for a
missing, stale or damaged index: the caller then searches exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grape_cli.errors import GrapeError
from grape_cli.store import ANN_POINTER, images_version, search_cache_dir

if TYPE_CHECKING:
    import numpy as np

    from grape_cli.store import Store

logger = logging.getLogger("grape")

DEFAULT_THRESHOLD = 1_000_000
FORMAT = 1
PREFIX = "ann-"
CALIBRATION_QUERIES = 128  # recall measured on 1,280 neighbours: about +-0.4% near 0.98
CALIBRATION_RECALL = 0.98
CALIBRATION_K = 10
# Queries unlike the images need more lists than the pseudo-queries: in tests/test_ann.py
# random directions reached recall 0.89 at the calibrated nprobe and 0.97 at twice it. A
# query costs time in proportion (milliseconds); a missed image costs the answer.
NPROBE_MARGIN = 2
TRAIN_PER_LIST = 40  # faiss warns below 39 training points per list
# Fewer than faiss's default 25, for a shorter build: recall is measured after the build
# (calibration), so rougher centroids cost a larger nprobe, never missed images.
KMEANS_ITERATIONS = 10
ADD_CHUNK = 100_000


class AnnDamaged(GrapeError):
    """The ANN index gave an answer that cannot be right (a row outside the table)."""


@dataclass
class Built:
    index: Any  # faiss.IndexIVFFlat
    nlist: int
    nprobe: int
    calibration_recall: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return f"IVF{self.nlist},Flat"


def threshold(manifest: dict) -> int:
    """Images from which `grape index` builds the ANN index (the manifest's setting)."""
    value = manifest.get("ann_threshold")
    return value if isinstance(value, int) and value >= 0 else DEFAULT_THRESHOLD


def plan_nlist(n: int) -> int:
    """Lists for n vectors: about sqrt(n) as a power of two (1024 at a million), with at
    least TRAIN_PER_LIST vectors per list to train on. More lists make a query cheaper
    but the build dearer (k-means and the assignment of every vector grow with them);
    at a million vectors sqrt(n) keeps the build near 2 minutes on 2 cores.

    >>> plan_nlist(1_000_000), plan_nlist(100_000), plan_nlist(5_000), plan_nlist(20)
    (1024, 256, 64, 1)
    """
    most = max(1, n // TRAIN_PER_LIST)
    target = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    return max(1, min(target, 2 ** int(math.log2(most))))


# --------------------------------------------------------------------------- building


def build(matrix: np.ndarray, *, nlist: int | None = None, seed: int = 0, progress=None) -> Built:
    """An IVF-Flat index of the rows of `matrix` (L2-normalised float32; a memory map is
    fine), with its calibrated nprobe. Uses every core faiss is allowed; `progress`
    (`advance(n)`) hears of the rows as they are added."""
    import faiss
    import numpy as np

    n, dim = matrix.shape
    nlist = nlist or plan_nlist(n)
    rng = np.random.default_rng(seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.spherical = True  # centroids on the sphere, where the vectors are
    index.cp.seed = seed
    train_n = min(n, nlist * TRAIN_PER_LIST)
    index.train(_rows(matrix, np.sort(rng.choice(n, train_n, replace=False))))
    timings["train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    queries = pseudo_queries(matrix, rng)
    truth = _TopK(queries, CALIBRATION_K)
    for first in range(0, n, ADD_CHUNK):  # one pass: each chunk added, and scanned exactly
        chunk = np.ascontiguousarray(matrix[first : first + ADD_CHUNK], dtype=np.float32)
        index.add(chunk)
        truth.scan(chunk, first)
        if progress is not None:
            progress.advance(len(chunk))
    timings["add_s"] = time.perf_counter() - start
    start = time.perf_counter()
    nprobe, recall = calibrate(index, queries, truth.rows)
    timings["calibrate_s"] = time.perf_counter() - start
    timings = {k: round(v, 2) for k, v in timings.items()}
    return Built(index, nlist, nprobe, recall, timings)


def pseudo_queries(matrix: np.ndarray, rng) -> np.ndarray:
    """Midpoints of random pairs of rows, normalised: queries that sit between images (and
    often between lists), harder for an IVF index than the images themselves. On the
    benchmark's data they needed 4 times the nprobe that text-like queries did for the
    same recall (benchmarks/ann_search.py), which makes them a conservative yardstick."""
    import numpy as np

    pairs = rng.integers(0, matrix.shape[0], (CALIBRATION_QUERIES, 2))
    queries = _rows(matrix, pairs[:, 0]) + _rows(matrix, pairs[:, 1])
    return queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)


def calibrate(index, queries: np.ndarray, truth: np.ndarray) -> tuple[int, float]:
    """(nprobe, recall@10 on `queries` at the smallest power of two that reaches
    CALIBRATION_RECALL against the exact top 10 `truth`): that nprobe times NPROBE_MARGIN,
    at most every list."""
    nprobe = 1
    while True:
        index.nprobe = nprobe
        _, found = index.search(queries, truth.shape[1])
        recall = recall_at_k(found, truth)
        if recall >= CALIBRATION_RECALL or nprobe >= index.nlist:
            return min(NPROBE_MARGIN * nprobe, index.nlist), recall
        nprobe *= 2


class _TopK:
    """The exact top k of fixed queries, kept up to date as chunks of rows are scanned."""

    def __init__(self, queries: np.ndarray, k: int):
        import numpy as np

        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        self.rows = np.zeros((len(queries), 0), dtype=np.int64)

    def scan(self, chunk: np.ndarray, first: int) -> None:
        import faiss
        import numpy as np

        s, i = faiss.knn(self.queries, chunk, min(self.k, len(chunk)), faiss.METRIC_INNER_PRODUCT)
        s, i = np.concatenate([self.scores, s], 1), np.concatenate([self.rows, i + first], 1)
        order = np.argsort(-s, axis=1, kind="stable")[:, : self.k]
        self.scores, self.rows = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each exact top-k list that the approximate list holds.

    >>> import numpy as np
    >>> recall_at_k(np.array([[1, 2, 3], [4, 5, -1]]), np.array([[3, 2, 1], [4, 6, 7]]))
    0.6666666666666666
    """
    k = truth.shape[1]
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / (k * len(truth)) if len(truth) else 1.0


def _rows(matrix, rows) -> np.ndarray:
    import numpy as np

    return np.ascontiguousarray(matrix[np.asarray(rows)], dtype=np.float32)


# --------------------------------------------------------------------------- searching


class AnnIndex:
    """A loaded ANN index: top-k by inner product among the lists each query probes."""

    def __init__(self, index, nprobe: int, count: int, kind: str):
        self._index = index
        self.nprobe, self.count, self.kind = nprobe, count, kind
        index.nprobe = nprobe

    def search(
        self, queries: np.ndarray, k: int, threads: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each queries x min(k, count), best first; rows of -1 pad a
        query whose probed lists hold fewer than k images. AnnDamaged when the index
        answers a row the table does not have."""
        import faiss
        import numpy as np

        from grape_cli.search import idle_threads

        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(threads or idle_threads(before))
        try:
            scores, rows = self._index.search(queries, min(k, self.count))
        finally:
            faiss.omp_set_num_threads(before)
        if ((rows < -1) | (rows >= self.count)).any():
            raise AnnDamaged("the ANN index answered a row outside the table")
        return scores, rows


def write_index(index, path: Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


def read_index(path: Path, nprobe: int, count: int | None = None) -> AnnIndex:
    """The index at `path`, memory-mapped: opening it reads almost nothing, and a search
    reads only the lists it probes. Checks what it can without reading the lists."""
    import faiss

    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    if not isinstance(index, faiss.IndexIVFFlat):
        raise ValueError(f"not an IVF-Flat index but {type(index).__name__}")
    count = index.ntotal if count is None else count
    sizes = sum(index.invlists.list_size(i) for i in range(index.nlist))
    if not index.ntotal == sizes == count:
        raise ValueError(f"{index.ntotal} vectors, lists of {sizes}, table of {count}")
    return AnnIndex(index, nprobe, count, f"IVF{index.nlist},Flat")


def rows_digest(paths: Sequence[str]) -> str:
    """A digest of the rows' paths in order: the ANN index's row numbers are positions.

    >>> rows_digest(["/a.jpg", "/b.jpg"]) != rows_digest(["/b.jpg", "/a.jpg"])
    True
    """
    # One join, not one update per path: 0.1 s instead of 0.5 s for a million paths.
    # No path holds a NUL, so the joined text tells the lists apart.
    text = "\0".join(paths).encode("utf-8", "surrogateescape")
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def load(root: Path, manifest: dict, paths: Sequence[str]) -> AnnIndex | None:
    """The ANN index of the index at `root` for its rows `paths` (in table order), or None
    when there is none or it is stale or damaged (logged at debug level): search exactly."""
    try:
        pointer = _current_pointer(Path(root), manifest)
        if pointer is None:
            return None
        if pointer["count"] != len(paths) or pointer["rows_digest"] != rows_digest(paths):
            logger.debug("ANN index not used: built for other rows; searching exactly")
            return None
        path = search_cache_dir(root) / pointer["file"]
        if path.stat().st_size != pointer["file_bytes"]:  # a cut file must never be mapped
            logger.debug("ANN index not used: %s has the wrong size; searching exactly", path)
            return None
        return read_index(path, int(pointer["nprobe"]), len(paths))
    except Exception as e:  # damaged in a way faiss noticed, or a pointer that is not one
        logger.debug("ANN index not used (%s: %s); searching exactly", type(e).__name__, e)
        return None


def is_current(root: Path, manifest: dict, count: int | None = None) -> bool:
    """Whether an ANN index was built from the table as it is (pointer only, no data).

    A searcher passes the table's `count`: then why there is none is logged (debug) when
    the index is past its threshold; `grape index`, which is about to rebuild, does not."""
    try:
        if _current_pointer(Path(root), manifest, quiet=count is None) is not None:
            return True
        if count is not None and count >= max(1, threshold(manifest)):
            logger.debug(
                "no current ANN index for %d images (threshold %d): searching exactly; "
                "`grape index` builds it",
                count,
                threshold(manifest),
            )
        return False
    except (OSError, ValueError, KeyError, TypeError) as e:
        if count is not None:
            logger.debug("ANN index not used (%s: %s); searching exactly", type(e).__name__, e)
        return False


def _current_pointer(root: Path, manifest: dict, quiet: bool = False) -> dict | None:
    try:
        pointer = json.loads((search_cache_dir(root) / ANN_POINTER).read_text("utf-8"))
    except FileNotFoundError:
        return None  # below the threshold, or invalidated by a write (see is_current)
    if (
        not isinstance(pointer, dict)
        or pointer.get("format") != FORMAT
        or pointer.get("model") != manifest.get("model")
        or pointer.get("dim") != manifest.get("dim")
        or pointer.get("table_version") is None
        or pointer.get("table_version") != images_version(root)
    ):
        if not quiet:
            logger.debug("ANN index not used: stale (the table changed); searching exactly")
        return None
    return pointer


# --------------------------------------------------------------------------- the files


def refresh(root: str | Path, *, store: Store | None = None, progress=None) -> dict:
    """Bring the ANN index in line with the table and the threshold: called at the end of
    `grape index`, under the writer lock, after the vector cache. Cheap when nothing
    changed (a few small files read). Never raises: a build that fails is logged and
    leaves no index, and `grape search` searches exactly. Returns what it did:
    {"state": "built" | "current" | "off" | "lance" | "failed", "images", "threshold", ...}.

    `progress` (`grape_cli.index.Progress`) hears of the vectors as they are added."""
    root = Path(root)
    try:
        return _refresh(root, store, progress)
    except Exception as e:
        message = e.message if isinstance(e, GrapeError) else f"{type(e).__name__}: {e}"
        logger.warning(
            "could not build the ANN index of %s (%s); `grape search` searches exactly",
            root,
            message,
        )
        clear(root)
        return {"state": "failed", "error": message}


def _refresh(root: Path, store: Store | None, progress) -> dict:
    from grape_cli import vectorcache
    from grape_cli.store import Store

    manifest = Store.read_manifest(root)
    limit = threshold(manifest)
    n = vectorcache.count(root, manifest)
    if n is None:
        store = store or Store.open(root)
        n = store.count()
    status = {"images": n, "threshold": limit}
    if n == 0 or n < limit:
        clear(root)
        return {"state": "off", **status}
    if is_current(root, manifest):
        return {"state": "current", **status, **_summary(_current_pointer(root, manifest))}
    store = store or Store.open(root)
    if store.has_vector_index():  # `grape search` uses the table's own ANN index
        clear(root)
        return {"state": "lance", **status}
    version = images_version(root)
    cached = vectorcache.load(root, manifest, mmap=True)
    if cached is not None:  # the vectors `grape index` just cached: no second LanceDB read
        matrix, paths = cached.matrix, cached.paths
    else:
        meta, matrix = store.load_matrix(("path",))
        paths = meta["path"]
    if version is None or len(paths) != n or images_version(root) != version:
        raise GrapeError("the table changed while its vectors were read")
    started = time.perf_counter()
    if progress is not None:
        progress.start(n, "ANN index")
    built = build(matrix, progress=progress)
    pointer = _write(root, manifest, built, version, paths)
    pointer["build_s"] = round(time.perf_counter() - started, 1)
    return {"state": "built", **status, **_summary(pointer)}


def _write(root: Path, manifest: dict, built: Built, version: str, paths) -> dict:
    folder = search_cache_dir(root)
    folder.mkdir(exist_ok=True)
    name = f"{PREFIX}{secrets.token_hex(6)}.faiss"
    write_index(built.index, folder / name)
    pointer = {
        "format": FORMAT,
        "kind": built.kind,
        "model": manifest["model"],
        "dim": manifest["dim"],
        "count": len(paths),
        "table_version": version,
        "rows_digest": rows_digest(paths),
        "file": name,
        "file_bytes": (folder / name).stat().st_size,
        "nlist": built.nlist,
        "nprobe": built.nprobe,
        "calibration_recall": round(built.calibration_recall, 4),
        "timings": built.timings,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = folder / f"{ANN_POINTER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(pointer), "utf-8")
    os.replace(tmp, folder / ANN_POINTER)  # readers see the old index or the new one
    _remove_files(folder, keep=name)
    return pointer


def clear(root: str | Path) -> None:
    """Invalidate, then remove, the ANN index (a reader that mapped it keeps its copy)."""
    folder = search_cache_dir(Path(root))
    (folder / ANN_POINTER).unlink(missing_ok=True)
    if folder.is_dir():
        _remove_files(folder, keep=None)


def _remove_files(folder: Path, keep: str | None) -> None:
    for path in folder.iterdir():
        if path.name.startswith(PREFIX) and path.name != keep:
            path.unlink(missing_ok=True)


def describe(root: str | Path) -> dict | None:
    """What `grape info` shows of the ANN index: None when there is none in use."""
    from grape_cli.store import Store

    try:
        manifest = Store.read_manifest(root)
        pointer = _current_pointer(Path(root), manifest, quiet=True)
    except (GrapeError, OSError, ValueError):
        return None
    return None if pointer is None else _summary(pointer)


def _summary(pointer: dict | None) -> dict:
    keys = ("kind", "nprobe", "calibration_recall", "file_bytes", "built", "build_s")
    return {k: pointer[k] for k in keys if k in pointer} if pointer else {}
