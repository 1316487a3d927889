"""`grape index`: bring an index up to date with folders of images, incrementally.

A file is re-embedded only if its (path, size, mtime) changed; a new path whose bytes
are already indexed (a move, rename or copy) reuses the stored embedding. Rows are
committed every `commit_every` images, so a killed run loses at most one batch of work
and the next run picks up from there. A run that finds nothing changed since the last
complete one answers from that run's snapshot of file states, without opening LanceDB.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from grape_cli.embed import content_hash, describe_error, embed_batches
from grape_cli.errors import IndexMismatch, InputError
from grape_cli.quick import refresh_cache
from grape_cli.store import Store, default_index_dir, path_id, read_snapshot, writer_lock
from grape_cli.walk import FoundFile, walk_images


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
) -> IndexSummary:
    """Index (or re-index) `roots` into `index_dir`; see the module docstring."""
    from grape_cli.models import DEFAULT_CLIP, canonical_clip_spec, load_clip

    started = time.perf_counter()
    progress = progress or _NoProgress()
    index_dir = Path(index_dir or default_index_dir()).expanduser().resolve()
    root_list = [str(Path(r).expanduser().resolve()) for r in roots]
    for r in root_list:
        if not Path(r).is_dir():
            raise InputError(f"{r} is not a folder", "pass folders of images to index")
    if not root_list:
        raise InputError("no folder to index", "pass one or more folders")

    # Decide the model before loading anything: a mismatch must fail in milliseconds.
    existing = Store.read_manifest(index_dir) if Store.exists(index_dir) else None
    spec = canonical_clip_spec(model) if model else (existing or {}).get("model", DEFAULT_CLIP)
    if existing and canonical_clip_spec(existing["model"]) != spec:
        raise IndexMismatch(
            f"index {index_dir} was built with {existing['model']}, not {spec}",
            "leave out --model to use the index's model, pass another --index, "
            f"or delete {index_dir} to rebuild",
        )
    clip = load_clip(spec, device, precision) if existing is None else None
    index_dir.mkdir(parents=True, exist_ok=True)
    with writer_lock(index_dir):
        found, skipped = walk_images(root_list, exclude, skip_dirs=[index_dir])
        if existing is not None:
            quick = _unchanged_summary(index_dir, existing, root_list, found, skipped, keep_missing)
            if quick is not None:
                refresh_cache(index_dir)  # if stale
                quick.seconds = time.perf_counter() - started
                return quick
            store = Store.open(index_dir)
        else:
            store = Store.open_for_write(index_dir, clip.spec, clip.dim)
        summary = IndexSummary(index=str(index_dir), model=store.model)
        states = store.file_states()
        known_failures = store.failures()
        new_failures = []
        for s in skipped:
            failure = known_failures.get(s.path)
            if failure and (failure["size"], failure["mtime_ns"]) == (s.size, s.mtime_ns):
                summary.failed.append({"path": s.path, "reason": s.reason, "new": False})
            else:
                new_failures.append(
                    {"path": s.path, "size": s.size, "mtime_ns": s.mtime_ns, "reason": s.reason}
                )

        todo: list[FoundFile] = []
        for f in found:
            state = states.get(f.path)
            if state and (state.size, state.mtime_ns) == (f.size, f.mtime_ns):
                summary.unchanged += 1
                continue
            failure = known_failures.get(f.path)
            if failure and (failure["size"], failure["mtime_ns"]) == (f.size, f.mtime_ns):
                # Failed before and unchanged since: not retried, still reported.
                summary.failed.append({"path": f.path, "reason": failure["reason"], "new": False})
                continue
            todo.append(f)

        # A moved or copied file has the size of a stored one: hash those now (I/O bound,
        # threads are enough) to reuse their embeddings. The decode workers hash the rest.
        stored_sizes = {s.size for s in states.values()}
        candidates = [f for f in todo if f.size in stored_sizes]
        hashes: dict[str, str] = {}
        unreadable: set[str] = set()
        if candidates:
            progress.start(len(candidates), "hashing")
            with ThreadPoolExecutor(8) as pool:
                paths = [f.path for f in candidates]
                for f, h in zip(candidates, pool.map(_safe_hash, paths), strict=True):
                    if isinstance(h, Exception):
                        new_failures.append(
                            {
                                "path": f.path,
                                "size": f.size,
                                "mtime_ns": f.mtime_ns,
                                "reason": describe_error(h),
                            }
                        )
                        unreadable.add(f.path)
                    else:
                        hashes[f.path] = h
                    progress.advance(1)
        todo = [f for f in todo if f.path not in unreadable]
        on_disk = {f.path for f in found}
        # Rows this run deletes; a new path with one's content is that file, moved.
        gone = (
            []
            if keep_missing
            else [s for p, s in states.items() if p not in on_disk and _under(p, root_list)]
        )
        gone_hashes = Counter(s.hash for s in gone)
        reusable = store.vectors_for_hashes(hashes.values()) if hashes else {}

        rows: list[dict] = []

        def row(f: FoundFile, vector, width: int, height: int) -> dict:
            return {
                "id": path_id(f.path),
                "path": f.path,
                "root": f.root,
                "size": f.size,
                "mtime_ns": f.mtime_ns,
                "hash": hashes[f.path],
                "width": width,
                "height": height,
                "vector": vector,
            }

        def flush(force: bool = False) -> None:
            if rows and (force or len(rows) >= commit_every):
                store.upsert(rows)
                store.clear_failures([r["path"] for r in rows if r["path"] in known_failures])
                rows.clear()

        to_encode: list[FoundFile] = []
        for f in todo:
            reuse = reusable.get(hashes.get(f.path))
            if reuse is None:
                to_encode.append(f)
                continue
            vector, width, height = reuse
            rows.append(row(f, vector, width, height))
            if f.path in states:
                summary.updated += 1
            elif gone_hashes[hashes[f.path]] > 0:
                gone_hashes[hashes[f.path]] -= 1  # one source per move: two copies are not
                summary.moved += 1
            else:
                summary.added += 1
            flush()
        flush(force=True)

        if to_encode:
            if clip is None:
                clip = load_clip(store.model, device, precision)
            progress.start(len(to_encode), "embedding")
            paths = [f.path for f in to_encode]
            for batch, vectors in embed_batches(clip, paths, batch_size, workers):
                for pos, reason in batch.failures:
                    f = to_encode[pos]
                    new_failures.append(
                        {"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns, "reason": reason}
                    )
                if vectors is not None:
                    for j, pos in enumerate(batch.positions):
                        f = to_encode[pos]
                        hashes[f.path] = batch.hashes[j]
                        w, h = batch.sizes[j]
                        rows.append(row(f, vectors[j].tolist(), w, h))
                        if f.path in states:
                            summary.updated += 1
                        else:
                            summary.added += 1
                    summary.encoded += len(batch.positions)
                flush()
                progress.advance(len(batch.positions) + len(batch.failures))
            flush(force=True)

        store.record_failures(new_failures)
        summary.failed.extend(
            {"path": r["path"], "reason": r["reason"], "new": True} for r in new_failures
        )
        failed_paths = {r["path"] for r in summary.failed}

        # Removals last: a run killed before this point only leaves rows a re-run deletes.
        store.delete_ids(s.id for s in gone)
        summary.removed = len(gone) - summary.moved
        stale_failures = [
            p for p in known_failures if _under(p, root_list) and p not in failed_paths
        ]
        store.clear_failures(stale_failures)
        # A file that used to index and now fails loses its row: its old embedding is stale.
        store.delete_ids(states[p].id for p in failed_paths if p in states)

        if summary.encoded or summary.removed or summary.moved or summary.updated:
            store.compact()
        roots_now = sorted(set(store.manifest.get("roots", [])) | set(root_list))
        store.write_manifest(roots=roots_now, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        store.write_snapshot()
        # What a cold `grape search` reads instead of LanceDB and torch; never fails the run.
        refresh_cache(index_dir, store=store, clip=clip)
    summary.seconds = time.perf_counter() - started
    return summary


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


def _safe_hash(path: str):
    try:
        return content_hash(path)
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
        "created": store.manifest.get("created"),
        "updated": store.manifest.get("updated"),
    }
