"""The fast path of a cold `grape search`: a text query without a rewriter, answered
without importing torch, open_clip, LanceDB or (below the ANN threshold) faiss.

Every `grape search` is a new process. The full path (`grape_cli.search`) spends about
6 s importing those libraries and loading the whole CLIP model before it encodes one
query. For a text query with `--rewriter none`, `grape index` prepares everything the
answer needs in the index's search cache (`store.SEARCH_CACHE`):

* the text tower exported to ONNX (`grape_cli.textonnx`) and CLIP's BPE merges for a
  torch-free tokenizer (`grape_cli.cliptok`), once per index;
* the vectors as a .npy matrix and their paths (`grape_cli.vectorcache`), rewritten
  whenever the images table changes.

`quick_search` answers from these files (the same hits, cosines within 1e-4, exact
top-k by numpy, or from grape's ANN index where the full path would use it, see
`grape_cli.ann`) or returns None, and the caller takes the full path, when the query is
out of its scope or anything in the cache is missing, stale or damaged. `refresh_cache`
brings the cache up to date and never fails an index run.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from grape_cli import ann, vectorcache
from grape_cli.errors import GrapeError
from grape_cli.ranking import rank_positions
from grape_cli.search import Hit, SearchResult, Timer, idle_threads, warn_if_truncated
from grape_cli.store import Store, default_index_dir, search_cache_dir

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger("grape")

TEXT_CACHE = "text.json"  # in the search cache: names the current text tower export
TEXT_FORMAT = 1
TEXT_PREFIXES = ("text-", "merges-")


# --------------------------------------------------------------------------- searching


def quick_search(
    query: str | None,
    index_dir: str | Path | None = None,
    k: int = 10,
    *,
    rewriter: str | None = "none",
    image: str | Path | None = None,
    backend: str = "auto",
    device: str | None = None,
    prompt: object = None,
    threads: int | None = None,
    exact: bool = False,
) -> SearchResult | None:
    """`grape_cli.search.search` for a plain text query, from the search cache; None when
    the query is out of scope or the cache cannot answer (never raises for that).

    Where the full path would answer from grape's ANN index (grape_cli.ann), so does
    this one, from the same file and with the same nprobe: the same hits either way."""
    query = (query or "").strip()
    if (
        not query  # the full path reports it
        or k < 1
        or (rewriter or "").strip().lower() not in ("", "none")  # as load_rewriter reads it
        or image is not None
        or prompt is not None  # a --prompt-file is checked by the full path, even unused
        or backend not in ("auto", "faiss")  # "lance": its ANN index (see vectorcache.write)
        or device not in (None, "auto", "cpu")  # a GPU asked for: the full path uses it
    ):
        return None
    try:
        return _search(query, index_dir, k, threads, exact)
    except Exception as e:
        # A damaged cache, a missing module, an ONNX Runtime error: the full path answers.
        logger.debug("fast search path not taken: %s: %s", type(e).__name__, e)
        return None


def _search(query: str, index_dir, k: int, threads, exact: bool) -> SearchResult | None:
    from grape_cli.cliptok import ClipTokenizer
    from grape_cli.textonnx import OnnxTextEncoder

    root = Path(index_dir or default_index_dir()).expanduser().resolve()
    manifest = Store.read_manifest(root)
    text = _text_export(root, manifest)
    if text is None:
        return None
    folder = search_cache_dir(root)
    timings: dict[str, float] = {}
    timer = Timer(timings)
    # Paid up front, one stage each, as the full path reports its imports.
    with timer.stage("import_numpy"):
        import numpy  # noqa: F401
    with timer.stage("import_onnxruntime"):
        import onnxruntime  # noqa: F401
    count = vectorcache.count(root, manifest)
    use_ann = not exact and count is not None and ann.is_current(root, manifest, count)
    with timer.stage("index_load"):
        vectors = vectorcache.load(root, manifest, mmap=use_ann)  # ANN: rows only, in effect
    if vectors is None or not vectors.paths:
        return None
    index = _open_ann(root, manifest, vectors.paths, timer) if use_ann else None
    with timer.stage("tokenizer_load"):
        tokenizer = ClipTokenizer.from_file(folder / text["merges"], text["context_length"])
    with timer.stage("tokenize"):
        ids = tokenizer.encode(query)
        tokens = tokenizer.pack([ids])
    with timer.stage("model_load"):
        encoder = OnnxTextEncoder(
            folder / text["onnx"], threads or idle_threads(os.cpu_count() or 1)
        )
    with timer.stage("encode"):
        vector = encoder.encode(tokens)[0]
    with timer.stage("search"):
        ranked = _ann_top_k(index, vector, k, threads) if index is not None else None
        ranked_by_ann = ranked is not None
        if ranked is None:
            ranked = top_k(vectors.matrix, vector, k)
    warn_if_truncated(len(ids) + 2, tokenizer.context_length)  # start and end tokens
    return SearchResult(
        query=query,
        rewriter="none",
        rewrites=[query],
        hits=[
            Hit(rank, score, vectors.paths[row], *vectors.sizes[row])
            for rank, (row, score) in zip(
                rank_positions([score for _, score in ranked]), ranked, strict=True
            )
        ],
        index=str(root),
        model=manifest["model"],
        score_kind="cosine",
        backend="faiss-ivf" if ranked_by_ann else "numpy",
        timings=timings,
        exact=not ranked_by_ann,
    )


def _open_ann(root: Path, manifest: dict, paths: list[str], timer: Timer):
    """grape's ANN index as the full path opens it, or None (then: exact, as it would)."""
    with timer.stage("import_faiss"):
        import faiss  # noqa: F401
    with timer.stage("index_load"):
        return ann.load(root, manifest, paths)


def _ann_top_k(index, vector, k: int, threads) -> list[tuple[int, float]] | None:
    """[(row, cosine)] from the ANN index, or None when it proves damaged (search exactly)."""
    try:
        scores, rows = index.search(vector[None], k, threads)
    except ann.AnnDamaged as e:
        logger.debug("%s; searching exactly", e.message)
        return None
    return [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]


def top_k(matrix: np.ndarray, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Exact [(row, cosine)] of the k best rows, best first (ties: lower row first).

    >>> import numpy as np
    >>> top_k(np.eye(3, dtype=np.float32), np.array([0.0, 1.0, 0.5], np.float32), 2)
    [(1, 1.0), (2, 0.5)]
    """
    import numpy as np

    scores = matrix @ vector.astype(np.float32)
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    best = best[np.lexsort((best, -scores[best]))]
    return [(int(row), float(scores[row])) for row in best]


# --------------------------------------------------------------------------- the cache


def refresh_cache(index_dir: str | Path, *, store: Store | None = None, clip=None) -> None:
    """Bring the search cache of an index up to date: called at the end of `grape index`,
    under the writer lock. Cheap when it is current (a few file reads). Never raises:
    what cannot be written is logged, and `grape search` takes the full path.

    `store` and `clip` (a `grape_cli.models.ClipModel`), when the run has them open, save
    opening them again; the export itself always runs on the CPU in float32."""
    root = Path(index_dir)
    try:
        manifest = Store.read_manifest(root)
        if not vectorcache.is_current(root, manifest) and not vectorcache.write(
            store or Store.open(root)
        ):
            return  # no vector cache (an ANN index): the fast path will not answer
    except Exception as e:
        logger.warning("could not write the search cache of %s: %s", root, _describe(e))
        vectorcache.clear(root)
        return
    try:
        if _text_pointer(root, manifest) is None:
            _export_text(root, manifest["model"], clip)
    except Exception as e:
        logger.warning(
            "could not export the text encoder for fast searches (%s); `grape search` "
            "stays correct, it only takes seconds longer to start",
            _describe(e),
        )


def _export_text(root: Path, spec: str, clip) -> None:
    """Export the text tower and tokenizer, or record why this model cannot be."""
    import torch

    from grape_cli.models import load_clip
    from grape_cli.textonnx import ExportError, remove_leftovers

    if clip is None or clip.device != "cpu" or clip.dtype != torch.float32:
        clip = load_clip(spec, "cpu", "fp32")  # the export runs on the CPU in float32
    folder = search_cache_dir(root)
    folder.mkdir(exist_ok=True)
    remove_leftovers(folder)
    stem = secrets.token_hex(6)
    pointer: dict = {"format": TEXT_FORMAT, "model": spec}
    try:
        pointer.update(_export_files(clip, folder, stem))
    except ExportError as e:
        pointer["unsupported"] = e.message  # recorded: later runs do not retry
        logger.warning(
            "fast cold searches are off for %s: %s; `grape search` takes the full path",
            spec,
            e.message,
        )
    finally:  # whatever happened, no file of an unrecorded export stays behind
        keep = {name for key, name in pointer.items() if key in ("onnx", "weights", "merges")}
        for path in folder.glob(f"*-{stem}.*"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
    tmp = folder / f"{TEXT_CACHE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(pointer), encoding="utf-8")
    os.replace(tmp, folder / TEXT_CACHE)
    for path in folder.iterdir():  # earlier exports
        if path.name.startswith(TEXT_PREFIXES) and path.name not in keep:
            path.unlink(missing_ok=True)


def _export_files(clip, folder: Path, stem: str) -> dict:
    """Write `merges-STEM.txt` and `text-STEM.onnx` + `.weights`; the pointer's fields."""
    from grape_cli.cliptok import PROBES, check_same_ids, plain_open_clip_tokenizer
    from grape_cli.textonnx import ExportError, export_text_tower

    if not plain_open_clip_tokenizer(clip.tokenizer):
        raise ExportError("its tokenizer is not open_clip's plain CLIP BPE")
    tokenizer = _open_clip_merges(clip.context_length)
    if not check_same_ids(tokenizer, clip.tokenizer):
        raise ExportError("the torch-free tokenizer does not give open_clip's token ids")
    merges = f"merges-{stem}.txt"
    tokenizer.save(folder / merges)
    onnx_path = export_text_tower(clip, folder, f"text-{stem}", tokenizer.tokenize(list(PROBES)))
    return {
        "onnx": onnx_path.name,
        "weights": onnx_path.with_suffix(".weights").name,
        "merges": merges,
        "context_length": clip.context_length,
    }


@functools.lru_cache(maxsize=4)
def _open_clip_merges(context_length: int):
    """open_clip's shipped merges, parsed once per process (0.1 s each time otherwise)."""
    from grape_cli.cliptok import ClipTokenizer, open_clip_vocab_file

    return ClipTokenizer.from_file(open_clip_vocab_file(), context_length)


def _text_pointer(root: Path, manifest: dict) -> dict | None:
    """The export record for the index's model (an export or a recorded failure)."""
    try:
        pointer = json.loads((search_cache_dir(root) / TEXT_CACHE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if pointer.get("format") != TEXT_FORMAT or pointer.get("model") != manifest.get("model"):
        return None
    return pointer


def _text_export(root: Path, manifest: dict) -> dict | None:
    pointer = _text_pointer(root, manifest)
    if pointer is None or "onnx" not in pointer:
        return None
    return pointer


def _describe(e: Exception) -> str:
    text = e.message if isinstance(e, GrapeError) else f"{type(e).__name__}: {e}"
    return text.splitlines()[0] if text else type(e).__name__
