"""`grape index`: bring an index up to date with folders of images, incrementally.

A file is re-embedded only if its (path, size, mtime) changed; a new path whose bytes
are already indexed (a move, rename or copy) reuses the stored embedding. Rows are
committed every `commit_every` images, so a killed run loses at most one batch of work
and the next run picks up from there. A run that finds nothing changed since the last
complete one answers from that run's snapshot of file states, without opening LanceDB,
once it has checked that the tables are still the ones the snapshot describes.

Only regular files are read, each up to a size limit and within a time limit, so a FIFO,
a link to a device or a pathological image is one more bad file, listed with its reason.
A damaged index (a table or the manifest lost) is repaired: what is missing is rebuilt,
and nothing still readable is thrown away.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from grape_cli import ann
from grape_cli.embed import (
    DECODE_TIMEOUT_S,
    MAX_FILE_BYTES,
    Reading,
    content_hash,
    decode_image,
    describe_error,
    embed_batches,
)
from grape_cli.errors import IndexDamaged, IndexMismatch, IndexNotFound, InputError, UsageError
from grape_cli.quick import refresh_cache
from grape_cli.store import (
    Store,
    default_index_dir,
    path_id,
    read_snapshot,
    recover_manifest,
    update_manifest,
    writer_lock,
)
from grape_cli.walk import FoundFile, Skipped, walk_images

if TYPE_CHECKING:
    from grape_cli.models import ClipModel


class Progress(Protocol):
    """What indexing reports while it runs; the CLI renders it (a Rich bar)."""

    def start(self, total: int, description: str) -> None: ...

    def advance(self, n: int) -> None: ...


class _NoProgress:
    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@dataclass
class IndexSummary:
    index: str
    model: str
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    encoded: int = 0
    failed: list[dict] = field(default_factory=list)  # {path, reason, new: bool}
    seconds: float = 0.0
    repaired: list[str] = field(default_factory=list)  # damage found and repaired
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (--engine ray)
    ann: dict | None = None  # what became of the ANN index (grape_cli.ann.refresh)

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "failed_count": len(self.failed),
            "images_per_s": round(self.images_per_s, 2),
        }


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def index_folders(
    roots: Iterable[str | Path],
    index_dir: str | Path | None = None,
    model: str | None = None,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    exclude: Iterable[str] = (),
    keep_missing: bool = False,
    device: str | None = None,
    precision: str | None = None,
    commit_every: int = 512,
    progress: Progress | None = None,
    decode_timeout: float | None = DECODE_TIMEOUT_S,
    max_file_bytes: int = MAX_FILE_BYTES,
    decode=decode_image,
    engine: str = "local",
    ray_address: str | None = None,
    after_batch: Callable[[int], None] | None = None,
    ann_threshold: int | None = None,
) -> IndexSummary:
    """Index (or re-index) `roots` into `index_dir`; see the module docstring.

    Each file gets `decode_timeout` seconds to be read and decoded and may be at most
    `max_file_bytes` long; `decode` (file object, draft size) -> (RGB image, size) is
    Pillow's unless replaced. `engine="ray"` embeds on a Ray cluster (`ray_address`:
    None starts one on this machine, "auto" joins this machine's); see
    `grape_cli.ray_engine`, whose embedding actors call `after_batch` (tests).
    Pillow's unless replaced. `ann_threshold` (kept in the manifest for later runs):
    images from which the index gets an approximate index (grape_cli.ann).
    """
    if engine not in ("local", "ray"):
        raise UsageError(f"unknown engine {engine!r}", "use local or ray")
    if engine == "ray":
        from grape_cli.ray_engine import require_ray

        require_ray()
    from grape_cli.models import load_clip

    started = time.perf_counter()
    index_dir = Path(index_dir or default_index_dir()).expanduser().resolve()
    root_list = _folders(roots)
    existing, damaged = _recorded_manifest(index_dir, model)
    clip = None
    if existing is None:
        clip = load_clip(_model_spec(model, None), device, precision)
        Store.create(index_dir, clip.spec, clip.dim)  # the model is recorded before all else
        existing = {"model": clip.spec, "dim": clip.dim}
    with writer_lock(index_dir):
        found, skipped = walk_images(root_list, exclude, skip_dirs=[index_dir])
        summary, store = None, None
        if clip is None and not damaged:
            summary = _unchanged_summary(
                index_dir, existing, root_list, found, skipped, keep_missing
            )
            if summary is not None:
                refresh_cache(index_dir)  # only if missing or stale
        if summary is None:
            store = Store.open_for_write(index_dir, existing["model"], int(existing["dim"]))
            reading = Reading(decode_timeout, max_file_bytes, decode)
            progress = progress or _NoProgress()
            if engine == "ray":
                from grape_cli.ray_engine import RayRun

                run = RayRun(
                    *(store, root_list, progress, commit_every, reading),
                    _loader(clip, store, "cpu", "fp32"),  # the driver's copy only preprocesses
                    address=ray_address,
                    device=device,
                    precision=precision,
                    after_batch=after_batch,
                )
            else:
                load = _loader(clip, store, device, precision)
                run = _Run(store, root_list, progress, commit_every, reading, load)
            summary = run.run(found, skipped, keep_missing, batch_size, workers)
            # What a cold `grape search` reads instead of LanceDB and torch; never fails.
            refresh_cache(index_dir, store=store, clip=run.clip)
        if ann_threshold is not None:  # a setting, kept for later runs
            update_manifest(index_dir, ann_threshold=ann_threshold)
        # Past the threshold, an approximate index beside the vectors; never fails.
        summary.ann = ann.refresh(index_dir, store=store, progress=progress)
    summary.seconds = time.perf_counter() - started
    return summary


def _loader(clip, store: Store, device, precision) -> Callable[[], ClipModel]:
    """Loads the index's model when called (if at all), unless one is loaded already."""
    from grape_cli.models import load_clip

    return (lambda: clip) if clip else (lambda: load_clip(store.model, device, precision))


def _folders(roots: Iterable[str | Path]) -> list[str]:
    root_list = [str(Path(r).expanduser().resolve()) for r in roots]
    for r in root_list:
        if not Path(r).is_dir():
            raise InputError(f"{r} is not a folder", "pass folders of images to index")
    if not root_list:
        raise InputError("no folder to index", "pass one or more folders")
    return root_list


def _model_spec(model: str | None, manifest: dict | None) -> str:
    from grape_cli.models import DEFAULT_CLIP, canonical_clip_spec

    return canonical_clip_spec(model) if model else (manifest or {}).get("model", DEFAULT_CLIP)


def _recorded_manifest(index_dir: Path, model: str | None) -> tuple[dict | None, bool]:
    """(the index's manifest or None for a new index, whether it had to be recovered).

    Decided before any model is loaded: a mismatch fails in milliseconds. A damaged
    manifest is recovered from the images table (`Store.open_for_write` rewrites it);
    an index whose model cannot be told is refused rather than guessed.
    """
    from grape_cli.models import canonical_clip_spec

    damaged = False
    try:
        existing = Store.read_manifest(index_dir)
    except IndexNotFound:
        return None, False
    except IndexDamaged as e:
        existing, damaged = recover_manifest(index_dir, e), True
    spec = _model_spec(model, existing)
    if canonical_clip_spec(existing["model"]) != spec:
        raise IndexMismatch(
            f"index {index_dir} was built with {existing['model']}, not {spec}",
            "leave out --model to use the index's model, pass another --index, "
            f"or delete {index_dir} to rebuild",
        )
    return existing, damaged


class _Run:
    """One full run over an opened index: compare with the walk, reuse the embeddings of
    moved files, embed the rest, then record failures, remove what is gone and finish.

    `reading` bounds what one file may cost; `load_model` is called only when something
    needs embedding.
    """

    def __init__(
        self,
        store: Store,
        roots: list[str],
        progress: Progress,
        commit_every: int,
        reading: Reading,
        load_model: Callable[[], ClipModel],
    ):
        self.store, self.roots, self.progress = store, roots, progress
        self.commit_every, self.reading, self.load_model = commit_every, reading, load_model
        self.summary = IndexSummary(
            index=str(store.root), model=store.model, repaired=list(store.repairs)
        )
        self.states = store.file_states()
        self.known_failures = store.failures()
        self.new_failures: list[dict] = []
        self.hashes: dict[str, str] = {}  # path -> content hash of what this run stores
        self.rows: list[dict] = []  # not yet committed
        self.clip: ClipModel | None = None  # loaded only if something needed embedding

    def run(self, found, skipped, keep_missing: bool, batch_size: int, workers) -> IndexSummary:
        todo = self._hash_possible_moves(self._changed(found, skipped))
        on_disk = {f.path for f in found}
        # Rows this run deletes; a new path with one's content is that file, moved.
        gone = (
            []
            if keep_missing
            else [s for p, s in self.states.items() if p not in on_disk and _under(p, self.roots)]
        )
        to_encode = self._reuse_stored(todo, Counter(s.hash for s in gone))
        if to_encode:
            self._embed(to_encode, batch_size, workers)
        self._finish(gone)
        return self.summary

    def _fail(self, f: FoundFile | Skipped, reason: str) -> None:
        self.new_failures.append(
            {"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns, "reason": reason}
        )

    def _changed(self, found: list[FoundFile], skipped: list[Skipped]) -> list[FoundFile]:
        """The files to (re-)index; counts the unchanged and the known failures."""
        summary = self.summary
        for s in skipped:
            failure = self.known_failures.get(s.path)
            if failure and (failure["size"], failure["mtime_ns"]) == (s.size, s.mtime_ns):
                summary.failed.append({"path": s.path, "reason": s.reason, "new": False})
            else:
                self._fail(s, s.reason)
        todo: list[FoundFile] = []
        for f in found:
            state = self.states.get(f.path)
            if state and (state.size, state.mtime_ns) == (f.size, f.mtime_ns):
                summary.unchanged += 1
                continue
            failure = self.known_failures.get(f.path)
            if failure and (failure["size"], failure["mtime_ns"]) == (f.size, f.mtime_ns):
                # Failed before and unchanged since: not retried, still reported.
                summary.failed.append({"path": f.path, "reason": failure["reason"], "new": False})
                continue
            todo.append(f)
        return todo

    def _hash_possible_moves(self, todo: list[FoundFile]) -> list[FoundFile]:
        """A moved or copied file has the size of a stored one: hash those now (I/O bound,
        threads are enough) to reuse their embeddings. The decode workers hash the rest.
        Returns `todo` less the files that could not be read."""
        stored_sizes = {s.size for s in self.states.values()}
        candidates = [f for f in todo if f.size in stored_sizes]
        if not candidates:
            return todo
        unreadable: set[str] = set()
        self.progress.start(len(candidates), "hashing")
        max_bytes = self.reading.max_bytes
        with ThreadPoolExecutor(8) as pool:
            hashes = pool.map(lambda f: _safe_hash(f.path, max_bytes), candidates)
            for f, h in zip(candidates, hashes, strict=True):
                if isinstance(h, Exception):
                    self._fail(f, describe_error(h))
                    unreadable.add(f.path)
                else:
                    self.hashes[f.path] = h
                self.progress.advance(1)
        return [f for f in todo if f.path not in unreadable]

    def _row(self, f: FoundFile, vector, width: int, height: int) -> dict:
        return {
            "id": path_id(f.path),
            "path": f.path,
            "root": f.root,
            "size": f.size,
            "mtime_ns": f.mtime_ns,
            "hash": self.hashes[f.path],
            "width": width,
            "height": height,
            "vector": vector,
        }

    def _flush(self, force: bool = False) -> None:
        if self.rows and (force or len(self.rows) >= self.commit_every):
            self.store.upsert(self.rows)
            self.store.clear_failures(
                [r["path"] for r in self.rows if r["path"] in self.known_failures]
            )
            self.rows.clear()

    def _reuse_stored(self, todo: list[FoundFile], gone_hashes: Counter) -> list[FoundFile]:
        """Store rows for files whose content is already indexed; returns the others."""
        hashes = self.hashes
        reusable = self.store.vectors_for_hashes(hashes.values()) if hashes else {}
        to_encode: list[FoundFile] = []
        for f in todo:
            reuse = reusable.get(hashes.get(f.path))
            if reuse is None:
                to_encode.append(f)
                continue
            vector, width, height = reuse
            self.rows.append(self._row(f, vector, width, height))
            if f.path in self.states:
                self.summary.updated += 1
            elif gone_hashes[hashes[f.path]] > 0:
                gone_hashes[hashes[f.path]] -= 1  # one source per move: two copies are not
                self.summary.moved += 1
            else:
                self.summary.added += 1
            self._flush()
        self._flush(force=True)
        return to_encode

    def _embed(self, to_encode: list[FoundFile], batch_size: int, workers) -> None:
        clip = self.clip = self.load_model()
        summary = self.summary
        self.progress.start(len(to_encode), "embedding")
        paths = [f.path for f in to_encode]
        for batch, vectors in embed_batches(clip, paths, batch_size, workers, self.reading):
            for pos, reason in batch.failures:
                self._fail(to_encode[pos], reason)
            if vectors is not None:
                for j, pos in enumerate(batch.positions):
                    f = to_encode[pos]
                    self.hashes[f.path] = batch.hashes[j]
                    self.rows.append(self._row(f, vectors[j].tolist(), *batch.sizes[j]))
                    if f.path in self.states:
                        summary.updated += 1
                    else:
                        summary.added += 1
                summary.encoded += len(batch.positions)
            self._flush()
            self.progress.advance(len(batch.positions) + len(batch.failures))
        self._flush(force=True)

    def _finish(self, gone: list) -> None:
        """Failures, removals, compaction, manifest and snapshot, in an order that keeps a
        run killed at any point harmless."""
        store, summary = self.store, self.summary
        store.record_failures(self.new_failures)
        summary.failed.extend(
            {"path": r["path"], "reason": r["reason"], "new": True} for r in self.new_failures
        )
        failed_paths = {r["path"] for r in summary.failed}

        # Removals last: a run killed before this point only leaves rows a re-run deletes.
        store.delete_ids(s.id for s in gone)
        summary.removed = len(gone) - summary.moved
        stale_failures = [
            p for p in self.known_failures if _under(p, self.roots) and p not in failed_paths
        ]
        store.clear_failures(stale_failures)
        # A file that used to index and now fails loses its row: its old embedding is stale.
        store.delete_ids(self.states[p].id for p in failed_paths if p in self.states)

        if summary.encoded or summary.removed or summary.moved or summary.updated:
            store.compact()
        roots_now = sorted(set(store.manifest.get("roots", [])) | set(self.roots))
        store.write_manifest(roots=roots_now, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        store.write_snapshot()


def _unchanged_summary(
    index_dir: Path,
    manifest: dict,
    roots: list[str],
    found: list[FoundFile],
    skipped: list,
    keep_missing: bool,
) -> IndexSummary | None:
    """The summary of a run that would change nothing, told from the last complete run's
    snapshot without opening LanceDB; None when anything may differ (the full run decides)."""
    snapshot = read_snapshot(index_dir)
    if snapshot is None or not set(roots) <= set(manifest.get("roots", [])):
        return None
    rows, failures = snapshot["rows"], snapshot["failures"]
    summary = IndexSummary(index=str(index_dir), model=manifest["model"])
    seen = set()
    for s in skipped:
        known = failures.get(s.path)
        if known is None or known[:2] != [s.size, s.mtime_ns]:
            return None
        summary.failed.append({"path": s.path, "reason": s.reason, "new": False})
        seen.add(s.path)
    for f in found:
        known = rows.get(f.path) or failures.get(f.path)
        if known is None or known[:2] != [f.size, f.mtime_ns]:
            return None
        if f.path in rows:
            summary.unchanged += 1
        else:
            summary.failed.append({"path": f.path, "reason": known[2], "new": False})
        seen.add(f.path)
    gone = [p for p in (*failures, *([] if keep_missing else rows)) if p not in seen]
    return None if any(_under(p, roots) for p in gone) else summary


def _safe_hash(path: str, max_bytes: int):
    try:
        return content_hash(path, max_bytes)
    except Exception as e:
        return e


def index_info(index_dir: str | Path | None = None) -> dict:
    """What `grape info` shows."""
    store = Store.open(index_dir or default_index_dir())
    failures = store.failures()
    return {
        "index": str(store.root),
        "model": store.model,
        "dim": store.dim,
        "schema_version": store.manifest["schema_version"],
        "images": store.count(),
        "roots": store.manifest.get("roots", []),
        "failures": len(failures),
        "failed_files": sorted(failures)[:20],
        "size_bytes": store.disk_bytes(),
        "ann": ann.describe(store.root),
        "ann_threshold": ann.threshold(store.manifest),
        "created": store.manifest.get("created"),
        "updated": store.manifest.get("updated"),
    }
