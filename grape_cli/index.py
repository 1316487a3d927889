"""`grape index`: bring an index up to date with folders of images, incrementally.

A file is re-embedded only if its (path, size, mtime) changed; a new path whose bytes
are already indexed (a move, rename or copy) reuses the stored embedding. Rows are
committed every `commit_every` images, so a killed run loses at most one batch of work
and the next run picks up from there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from grape_cli.embed import content_hash, describe_error, embed_batches
from grape_cli.errors import IndexMismatch, InputError
from grape_cli.store import Store, default_index_dir, path_id
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
            f"or delete {index_dir} to rebuild")
    clip = None
    if existing is None:
        clip = load_clip(spec, device, precision)
        store = Store.open_for_write(index_dir, clip.spec, clip.dim)
    else:
        store = Store.open(index_dir)

    summary = IndexSummary(index=str(index_dir), model=store.model)
    with store.writer_lock():
        found, skipped = walk_images(root_list, exclude, skip_dirs=[index_dir])
        states = store.file_states()
        known_failures = store.failures()
        new_failures = [
            {"path": s.path, "size": s.size, "mtime_ns": s.mtime_ns, "reason": s.reason}
            for s in skipped
        ]

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

        # Hash the candidates (I/O bound, threads are enough) to spot moves and copies.
        hashes: dict[str, str] = {}
        if todo:
            progress.start(len(todo), "hashing")
            with ThreadPoolExecutor(8) as pool:
                for f, h in zip(todo, pool.map(_safe_hash, [f.path for f in todo]), strict=True):
                    if isinstance(h, Exception):
                        new_failures.append(
                            {
                                "path": f.path,
                                "size": f.size,
                                "mtime_ns": f.mtime_ns,
                                "reason": describe_error(h),
                            }
                        )
                    else:
                        hashes[f.path] = h
                    progress.advance(1)
        todo = [f for f in todo if f.path in hashes]
        on_disk = {f.path for f in found}
        gone_hashes = {s.hash for p, s in states.items() if p not in on_disk}
        reusable = store.vectors_for_hashes(hashes.values()) if todo else {}

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
                store.clear_failures([r["path"] for r in rows])
                rows.clear()

        to_encode: list[FoundFile] = []
        for f in todo:
            reuse = reusable.get(hashes[f.path])
            if reuse is None:
                to_encode.append(f)
                continue
            vector, width, height = reuse
            rows.append(row(f, vector, width, height))
            if f.path in states:
                summary.updated += 1
            elif hashes[f.path] in gone_hashes:
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
        if not keep_missing:
            gone = [s.id for p, s in states.items() if p not in on_disk and _under(p, root_list)]
            store.delete_ids(gone)
            summary.removed = len(gone)
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
    summary.seconds = time.perf_counter() - started
    return summary


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
