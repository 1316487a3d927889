"""`grape search`: rewrite the query, encode it with the index's own text encoder, and
return the top-k images by exact inner product (cosine: every vector is L2-normalised).

The index's vectors are loaded once into faiss (`IndexFlatIP`, on the GPU when faiss-gpu
and CUDA are there). Past `grape index --ann-threshold` images the index has its own
approximate index (grape_cli.ann), which search uses instead unless asked to be
`exact`; a missing, stale or damaged one means exact search. An index table that
carries a LanceDB ANN index is searched through LanceDB instead, which never loads the
vectors into memory: the way to search a collection too large for RAM.

Several rewrites (`rewrites > 1`, sampled) are fused with reciprocal rank fusion; an
image query (`image=`) is used alone or added to the text embedding with a weight.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from grape_cli.errors import InputError, UsageError
from grape_cli.query import DEFAULT_IMAGE_WEIGHT, Query, check_image_path
from grape_cli.ranking import rank_positions, reciprocal_rank_fusion
from grape_cli.store import Store, default_index_dir

if TYPE_CHECKING:
    import numpy as np

    from grape_cli.prompt import PromptTemplate

logger = logging.getLogger("grape")

RRF_DEPTH = 100  # each rewrite's ranking fused down to this depth (or k, if larger)
BACKENDS = ("auto", "faiss", "lance")
HEAVY_IMPORTS = ("torch", "open_clip", "lancedb", "faiss")


@dataclass
class Hit:
    rank: int  # `grape_cli.ranking`'s rank: a hit tied with the next shares the later rank
    score: float  # cosine for one query vector, the fused RRF score for several
    path: str
    width: int | None = None
    height: int | None = None


@dataclass
class SearchResult:
    query: str
    rewriter: str
    rewrites: list[str]
    hits: list[Hit]
    index: str
    model: str
    image: str | None = None
    image_weight: float | None = None
    score_kind: str = "cosine"  # or "rrf"
    rewriter_default: bool = False  # the index's default rewriter (no --rewriter given)
    backend: str = "faiss"  # "faiss-ivf": grape's ANN index (grape_cli.ann)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    exact: bool = True  # False: an ANN index answered (the hits may miss a better image)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        return d


class Timer:
    """Seconds spent per named stage, in the order they ran."""

    def __init__(self, into: dict[str, float] | None = None):
        self.seconds: dict[str, float] = {} if into is None else into

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


# --------------------------------------------------------------------------- vectors


class VectorIndex:
    """Exact top-k by inner product over a fixed float32 matrix (faiss IndexFlatIP)."""

    def __init__(self, matrix: np.ndarray, device: str = "cpu", threads: int | None = None):
        import faiss
        import numpy as np

        self.size, self.dim = matrix.shape
        self.threads = threads  # None: the cores other processes leave idle
        index = faiss.IndexFlatIP(self.dim)
        index.add(np.ascontiguousarray(matrix, dtype=np.float32))
        self.on_gpu = False
        if (
            device.startswith("cuda")
            and hasattr(faiss, "StandardGpuResources")
            and faiss.get_num_gpus() > 0
        ):
            self._gpu_resources = faiss.StandardGpuResources()
            gpu = int(device.partition(":")[2] or 0)
            index = faiss.index_cpu_to_gpu(self._gpu_resources, gpu, index)
            self.on_gpu = True
        self._index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each queries x min(k, size), best first."""
        import faiss
        import numpy as np

        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, self.size)
        if self.on_gpu:
            return self._index.search(queries, k)
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.threads or idle_threads(before))
        try:
            return self._index.search(queries, k)
        finally:
            faiss.omp_set_num_threads(before)


def idle_threads(available: int) -> int:
    """Threads for one search: the cores that other processes leave idle, at least one.

    OpenMP threads wait for the slowest of them, so a thread that shares its core with
    another busy process stalls the whole scan: on a 2-core machine running other jobs,
    two threads took 100 ms a query where one took 35 ms (benchmarks/search_latency.py).
    """
    try:
        busy = os.getloadavg()[0] - 1  # the load average counts this process too
    except OSError:  # not available on this platform
        return available
    return max(1, min(available, round(available - busy)))


@contextmanager
def cpu_threads(threads: int | None = None):
    """torch and faiss (those already imported) held to `threads` inside the block, the
    idle cores by default (`idle_threads`); restored after. Yields the number used.

    On a busy machine this matters more than anything else here: a ViT-B-32 text query
    took 650-2,650 ms with two threads and 120-160 ms with one on a loaded 2-core box.
    """
    import sys

    torch, faiss = sys.modules.get("torch"), sys.modules.get("faiss")
    before = (
        torch.get_num_threads() if torch else None,
        faiss.omp_get_max_threads() if faiss else None,
    )
    n = threads or idle_threads(before[0] or before[1] or os.cpu_count() or 1)
    if torch:
        torch.set_num_threads(n)
    if faiss:
        faiss.omp_set_num_threads(n)
    try:
        yield n
    finally:
        if torch:
            torch.set_num_threads(before[0])
        if faiss:
            faiss.omp_set_num_threads(before[1])


# --------------------------------------------------------------------------- searcher


class Searcher:
    """An opened index with its text encoder, rewriter and vectors: load once, search many.

    `timings` accumulates the seconds of each loading stage; `search` adds its own stages
    to the result's timings.
    """

    def __init__(
        self,
        index_dir: str | Path | None = None,
        *,
        rewriter: str | None = None,  # None: the index's default rewriter, if it has one
        device: str | None = None,
        prompt: PromptTemplate | None = None,
        trust_remote_code: bool = False,
        backend: str = "auto",
        threads: int | None = None,
        timings: dict[str, float] | None = None,
        exact: bool = False,
    ):
        if backend not in BACKENDS:
            raise UsageError(f"unknown search backend {backend!r}", f"use one of {BACKENDS}")
        self.timings: dict[str, float] = {} if timings is None else timings
        timer = Timer(self.timings)
        root = Path(index_dir or default_index_dir()).expanduser().resolve()
        Store.read_manifest(root)  # no index: fail before the heavy imports
        # Paid up front, one stage each, so the stages below time only their own work
        # (open_clip's own cost includes torchvision and transformers, which it imports).
        for module in HEAVY_IMPORTS:
            with timer.stage(f"import_{module}"):
                importlib.import_module(module)
        with timer.stage("index_open"):
            self.store = Store.open(root)
            self.size = self.store.count()
        if self.size == 0:
            raise InputError(
                f"index {root} has no images yet", "add some with `grape index PHOTOS_DIR`"
            )
        from grape_cli.models import load_clip, pick_device
        from grape_cli.rewrite import load_rewriter
        from grape_cli.rewriters import resolve

        rewriter, self.rewriter_default = resolve(root, rewriter, self.store.model)
        self.device = pick_device(device)
        self.threads = threads  # None: the idle cores, decided at each step
        lance_index = self.store.has_vector_index()
        if backend == "auto":
            backend = "lance" if lance_index else "faiss"
        self.backend = backend
        # Approximate only where an ANN index answers: LanceDB's, or grape's (_open_ann).
        self.exact = exact or not (backend == "lance" and lance_index)
        self._index: VectorIndex | None = None
        self._ann = None  # grape_cli.ann.AnnIndex, when one answers
        self._paths: list[str] = []
        self._sizes: list[tuple[int, int]] = []
        self._rows: dict[str, int] = {}
        with cpu_threads(threads):
            with timer.stage("rewriter_load"):
                self.rewriter = load_rewriter(
                    rewriter,
                    device=self.device,
                    prompt=prompt,
                    trust_remote_code=trust_remote_code,
                    retriever=self.store.model,
                )
            with timer.stage("model_load"):
                self.clip = load_clip(self.store.model, self.device)
            if backend == "faiss":
                with timer.stage("index_load"):
                    if not exact:
                        self._open_ann()
                    if self._ann is None:
                        self._load_exact()

    @property
    def sees_images(self) -> bool:
        """Whether the rewriter reads a composed query's reference image (a VLM)."""
        return getattr(self.rewriter, "sees_images", False)

    def _load_exact(self) -> None:
        meta, matrix = self.store.load_matrix(("path", "width", "height"))
        self._paths = meta["path"]
        self._sizes = list(zip(meta["width"], meta["height"], strict=True))
        self._index = VectorIndex(matrix, self.device)
        self._ann, self.backend, self.exact = None, "faiss", True

    def _open_ann(self) -> None:
        """grape's ANN index, when the index has a current one (grape_cli.ann)."""
        from grape_cli import ann

        if not ann.is_current(self.store.root, self.store.manifest, self.size):
            return
        meta = self.store.read_columns(("path", "width", "height"))
        self._ann = ann.load(self.store.root, self.store.manifest, meta["path"])
        if self._ann is not None:
            self._paths = meta["path"]
            self._sizes = list(zip(meta["width"], meta["height"], strict=True))
            self.backend, self.exact = "faiss-ivf", False

    # ------------------------------------------------------------------ encoding

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        for text in texts:
            warn_if_truncated(self.clip.count_tokens(text), self.clip.context_length)
        return self.clip.encode_texts(texts).numpy()

    def encode_image(self, path: str | Path) -> np.ndarray:
        from grape_cli.query import encode_image_file

        return encode_image_file(self.clip, str(path))

    # ------------------------------------------------------------------ searching

    def search_vectors(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of each query vector's top k, best first."""
        if self._ann is not None:
            from grape_cli.ann import AnnDamaged

            try:
                return self._ann.search(vectors, k, self.threads)
            except AnnDamaged as e:  # from now on this searcher searches exactly
                logger.debug("%s; searching exactly", e.message)
                self._load_exact()
        if self._index is not None:
            return self._index.search(vectors, k)
        if not self._paths:  # the ANN path answers with paths; rows are positions here
            meta = self.store.read_columns(("path", "width", "height"))
            self._paths = meta["path"]
            self._sizes = list(zip(meta["width"], meta["height"], strict=True))
            self._rows = {p: i for i, p in enumerate(self._paths)}
        return self.store.ann_search(vectors, k, self._rows, exact=self.exact)

    def _encode_query(self, query: Query, rewrites, temperature, timer):
        from grape_cli.query import blend

        texts: list[str] = []
        if query.text:
            with timer.stage("rewrite"):
                texts = self.rewriter.rewrite([query], n=rewrites, temperature=temperature)[0]
        with timer.stage("encode"):
            vectors = self.encode_texts(texts) if texts else None
            # A vision-language rewriter's caption describes the wanted image on its own.
            blended = query.image is not None and not (texts and self.sees_images)
            image_vec = self.encode_image(query.image) if blended else None
            vectors = blend(vectors, image_vec, query.image_weight)
        return texts, vectors

    def _rank(self, vectors, k: int) -> tuple[list[tuple[int, float]], str]:
        """[(row, score)] best first: cosine for one vector, fused by RRF for several."""
        if len(vectors) == 1:
            scores, rows = self.search_vectors(vectors, k)
            return list(zip(rows[0].tolist(), scores[0].tolist(), strict=True)), "cosine"
        _, rows = self.search_vectors(vectors, max(k, RRF_DEPTH))
        return reciprocal_rank_fusion([r[r >= 0].tolist() for r in rows])[:k], "rrf"

    def search(
        self,
        query: Query | str | None,
        k: int = 10,
        *,
        rewrites: int = 1,
        image: str | Path | None = None,
        image_weight: float = DEFAULT_IMAGE_WEIGHT,
        temperature: float | None = None,
    ) -> SearchResult:
        """Top k for `query` (a Query, or text plus the `image`/`image_weight` keywords)."""
        query = _make_query(query, image, image_weight)
        check_query(query, k, rewrites)
        timings: dict[str, float] = {}
        with cpu_threads(self.threads):
            texts, vectors = self._encode_query(query, rewrites, temperature, Timer(timings))
            with Timer(timings).stage("search"):
                ranked, kind = self._rank(vectors, k)
        ranked = [(row, score) for row, score in ranked if row >= 0]
        positions = (
            rank_positions([s for _, s in ranked])
            if kind == "cosine"
            else range(1, len(ranked) + 1)
        )
        hits = [
            Hit(rank, float(score), self._paths[row], *self._sizes[row])
            for rank, (row, score) in zip(positions, ranked, strict=True)
        ]
        return SearchResult(
            query=query.text,
            rewriter=self.rewriter.name,
            rewrites=texts,
            hits=hits,
            index=str(self.store.root),
            model=self.store.model,
            image=query.image,
            image_weight=(
                query.image_weight
                if (query.image is not None and texts and not self.sees_images)
                else None
            ),
            score_kind=kind,
            rewriter_default=self.rewriter_default,
            backend=self.backend,
            timings={**self.timings, **timings},
            exact=self.exact,
        )


def warn_if_truncated(n_tokens: int, context_length: int) -> None:
    """The warning both search paths give for a query longer than the retriever reads."""
    if n_tokens > context_length:
        logger.warning(
            "the query is %d tokens and the retriever reads only the first %d; "
            "a rewriter (--rewriter zero-shot) can shorten it",
            n_tokens,
            context_length,
        )


def _make_query(query, image, image_weight) -> Query:
    if isinstance(query, Query):
        return query
    return Query((query or "").strip(), str(image) if image is not None else None, image_weight)


def check_query(query: Query, k: int, rewrites: int) -> None:
    """The checks that need no model: run before anything is loaded."""
    if query.empty:
        raise InputError("the query is empty", "type what you are looking for, or pass an image")
    if k < 1:
        raise UsageError(f"k = {k}: need at least 1 result", "ask for 1 or more")
    if rewrites < 1:
        raise UsageError(f"rewrites = {rewrites}: need at least 1", "ask for 1 or more")
    if query.image is not None:
        check_image_path(query.image)


def search(
    query: str | None,
    index_dir: str | Path | None = None,
    k: int = 10,
    *,
    rewriter: str | None = None,
    rewrites: int = 1,
    image: str | Path | None = None,
    image_weight: float = 1.0,
    temperature: float | None = None,
    device: str | None = None,
    prompt: PromptTemplate | None = None,
    trust_remote_code: bool = False,
    backend: str = "auto",
    threads: int | None = None,
    seed: int | None = None,
    exact: bool = False,
) -> SearchResult:
    """One search, from nothing loaded to ranked hits; `result.timings` has every stage.
    `exact`: brute force even where an ANN index would answer."""
    query = _make_query(query, image, image_weight)
    check_query(query, k, rewrites)
    searcher = Searcher(
        index_dir,
        rewriter=rewriter if query.text else "none",  # an image alone needs no rewriter
        device=device,
        prompt=prompt,
        trust_remote_code=trust_remote_code,
        backend=backend,
        threads=threads,
        exact=exact,
    )
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    return searcher.search(query, k, rewrites=rewrites, temperature=temperature)
