"""The index on disk: a LanceDB table of image rows plus a small manifest.

Layout of an index folder:
  grape-index.json   manifest: schema version, embedding model spec and dimension, roots
  images.lance/      one row per image (see `image_schema`)
  failures.lance/    files that could not be indexed, with the reason
  file-states.json   (path, size, mtime) of every row and failure as a complete run left
                     them, and a fingerprint of the tables' files then; any write deletes
                     it first. A cache only: trusted while the tables are byte for byte
                     the ones it describes
  .lock              held (flock) by the one process allowed to write
  search-cache/      derived files for a fast cold `grape search` (grape_cli.quick): the
                     vectors as a .npy matrix and the exported text tower; never the truth,
                     rebuilt at the end of `grape index`, ignored whenever stale; past
                     the manifest's `ann_threshold` images, also an approximate index
                     (grape_cli.ann), as derived and as disposable

A new index appears at once with its manifest and empty tables (see `Store.create`), so
whatever a killed run leaves, the index knows its model; the images table records the
model too, so a lost manifest can be rebuilt. Every write is a LanceDB commit (atomic), and rows are keyed by
a stable id derived from the path, so a writer killed at any moment leaves a consistent
index that the next run completes without duplicates. Readers refuse a damaged index
(IndexDamaged); `grape index` repairs it, never discarding rows it can still read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grape_cli.errors import IndexDamaged, IndexLocked, IndexMismatch, IndexNotFound, InputError

SCHEMA_VERSION = 1
MANIFEST = "grape-index.json"
SNAPSHOT = "file-states.json"
IMAGES = "images"
FAILURES = "failures"
SEARCH_CACHE = "search-cache"
VECTOR_CACHE = "vectors.json"  # in SEARCH_CACHE: names the current vector files
ANN_POINTER = "ann.json"  # in SEARCH_CACHE: names the current ANN index (grape_cli.ann)

# Lock fds this process holds. A forked child (a DataLoader worker) closes its copies at
# once: a flock belongs to the open file, so an orphaned worker of a killed writer would
# otherwise keep the index locked until it noticed its parent was gone.
_HELD_LOCKS: set[int] = set()


def _drop_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        with suppress(OSError):
            os.close(fd)  # closes the child's copy only; the parent keeps its lock
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Exclusive write access to the index folder `root` (which must exist); released by
    the kernel even if the process is killed. Needs no LanceDB: see `read_snapshot`."""
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexLocked(
                f"another grape process is writing to {root}",
                "wait for it to finish, or use another --index",
            ) from None
        _HELD_LOCKS.add(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)


def read_snapshot(root: Path) -> dict | None:
    """{"rows": {path: [size, mtime_ns]}, "failures": {path: [size, mtime_ns, reason]},
    "tables": fingerprint} as the last complete write left the index, or None when there
    is none or the tables are no longer the ones it describes (see `table_fingerprint`).
    Lets a run that finds nothing changed skip LanceDB altogether (importing it alone
    takes over a second)."""
    try:
        snapshot = json.loads((root / SNAPSHOT).read_text())
        if snapshot["tables"] == table_fingerprint(root):
            return snapshot
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def table_fingerprint(root: Path) -> dict[str, str | None]:
    """A digest of the names and sizes of every file of each table, without LanceDB.

    Lance never rewrites a file in place: each commit adds new ones, so equal fingerprints
    mean the same tables, with the same rows, as when the snapshot was taken. A table
    removed, replaced, rolled back or missing a file changes it.
    """
    prints: dict[str, str | None] = {}
    for name in (IMAGES, FAILURES):
        folder = root / f"{name}.lance"
        if not folder.is_dir():
            prints[name] = None
            continue
        files = sorted(
            (os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)))
            for d, _, names in os.walk(folder)
            for f in names
        )
        prints[name] = hashlib.blake2b(repr(files).encode(), digest_size=16).hexdigest()
    return prints


def update_manifest(root: Path, **fields: Any) -> None:
    """Set manifest fields (settings such as `ann_threshold`) without opening LanceDB;
    atomic, as `Store.write_manifest`. Call it holding the writer lock."""
    manifest = Store.read_manifest(root)
    manifest.update(fields)
    tmp = Path(root) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, Path(root) / MANIFEST)


def search_cache_dir(root: Path) -> Path:
    return Path(root) / SEARCH_CACHE


def images_version(root: Path) -> str | None:
    """A token that changes with every commit to the images table, read without LanceDB:
    a digest of the names of its version manifests (one per commit), or None when the
    table is not laid out as expected. A search cache made from another token is stale."""
    try:
        names = sorted(n for n in os.listdir(Path(root) / f"{IMAGES}.lance" / "_versions"))
    except OSError:
        return None
    manifests = [n for n in names if n.endswith(".manifest")]
    if not manifests:
        return None
    return hashlib.blake2b("\n".join(manifests).encode(), digest_size=12).hexdigest()


def default_index_dir() -> Path:
    """$GRAPE_INDEX, else $GRAPE_HOME/index, else the per-user data folder."""
    if os.environ.get("GRAPE_INDEX"):
        return Path(os.environ["GRAPE_INDEX"]).expanduser()
    return grape_home() / "index"


def grape_home() -> Path:
    if os.environ.get("GRAPE_HOME"):
        return Path(os.environ["GRAPE_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or (
        "~/Library/Application Support" if os.uname().sysname == "Darwin" else "~/.local/share"
    )
    return Path(base).expanduser() / "grape"


def path_id(path: str) -> str:
    """Stable row id for an absolute path (the same path always gets the same id).

    >>> path_id("/photos/cat.jpg")
    '1190265e44c9de4e1a802aed'
    """
    return hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()


def image_schema(dim: int, model: str | None = None):
    """The images table's schema; with `model` (at creation), the table records it, so
    that the manifest can be rebuilt from the table alone."""
    import pyarrow as pa

    metadata = {"grape.model": model, "grape.dim": str(dim)} if model else None
    return pa.schema(
        [
            ("id", pa.string()),
            ("path", pa.string()),
            ("root", pa.string()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("hash", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("vector", pa.list_(pa.float32(), dim)),
        ],
        metadata=metadata,
    )


def failure_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("path", pa.string()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("reason", pa.string()),
        ]
    )


@dataclass(frozen=True)
class FileState:
    id: str
    size: int
    mtime_ns: int
    hash: str


class Store:
    """An opened index. Create with `Store.open` (read) or `Store.open_for_write`."""

    def __init__(self, root: Path, manifest: dict):
        import lancedb

        self.root = root
        self.manifest = manifest
        self._db = lancedb.connect(str(root))
        self._snapshot_dropped = False
        self.repairs: list[str] = []  # what open_for_write repaired

    # ------------------------------------------------------------------ opening

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @classmethod
    def exists(cls, root: str | Path) -> bool:
        return (Path(root) / MANIFEST).is_file()

    @classmethod
    def read_manifest(cls, root: str | Path) -> dict:
        root = Path(root)
        if not (root / MANIFEST).is_file():
            if (root / f"{IMAGES}.lance").exists():
                raise _damaged(root, f"{MANIFEST} is missing")
            raise IndexNotFound(
                f"no grape index at {root}",
                "build one with `grape index PHOTOS_DIR` (or pass --index)",
            )
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise _damaged(root, f"{MANIFEST} cannot be read ({_first_line(e)})") from None
        if not isinstance(manifest, dict):
            raise _damaged(root, f"{MANIFEST} is not a JSON object")
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise IndexMismatch(
                f"index {root} has schema version {manifest.get('schema_version')}, this grape "
                f"reads version {SCHEMA_VERSION}",
                f"rebuild it: delete {root} and run grape index",
            )
        if not isinstance(manifest.get("model"), str) or not isinstance(manifest.get("dim"), int):
            raise _damaged(root, f"{MANIFEST} does not name the model and its dimension")
        return manifest

    @classmethod
    def open(cls, root: str | Path) -> Store:
        """Open an index to read it; a missing table is IndexDamaged (`grape index` repairs)."""
        root = Path(root).expanduser().resolve()
        manifest = cls.read_manifest(root)
        for name in (IMAGES, FAILURES):
            if not (root / f"{name}.lance").is_dir():
                raise _damaged(root, f"its table {name} is missing")
        return cls(root, manifest)

    @classmethod
    def create(cls, root: str | Path, model: str, dim: int) -> None:
        """Start a new index, recording its model before anything else can happen.

        The folder appears at once with its manifest and empty tables (built in a hidden
        folder beside it, then renamed): a run killed at any moment leaves either no
        index or one that knows its model. In a folder that already exists (made empty
        beforehand), the tables, which record the model too, come before the manifest.
        When another process created the index first, it must have chosen the same model.
        """
        root = Path(root).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise InputError(f"{root} is a file, not an index folder", "pass another --index")
        manifest = _new_manifest(model, dim)
        if not root.exists() and _create_beside(root, manifest):
            return
        if not (root / MANIFEST).exists():
            cls(root, manifest)._create_tables()
            if _link_manifest(root, manifest):
                return
        recorded = cls.read_manifest(root)
        if (recorded["model"], recorded["dim"]) != (model, dim):
            raise _mismatch(root, recorded, model, dim)

    def _create_tables(self) -> None:
        self._create_table(IMAGES, image_schema(self.dim, self.model))
        self._create_table(FAILURES, failure_schema())

    @classmethod
    def open_for_write(cls, root: str | Path, model: str, dim: int) -> Store:
        """Open (or create) an index for `model`; refuses one built with another model.

        Repairs what a reader refuses, keeping every row it can read: a damaged manifest
        is rebuilt from what the images table records, a missing table is created, and
        one that cannot be read is moved aside (`images.lance.damaged-TIME`) and created
        anew. `store.repairs` says what was done. Call it holding the writer lock.
        """
        root = Path(root).expanduser().resolve()
        repairs = []
        try:
            store = cls.open(root)
        except IndexNotFound:
            cls.create(root, model, dim)
            store = cls(root, cls.read_manifest(root))
        except IndexDamaged:
            try:
                store = cls(root, cls.read_manifest(root))  # only a table is missing
            except IndexDamaged as e:
                store = cls(root, recover_manifest(root, e))
                repairs.append(f"{e.damage}: rebuilt from the images table")
        if (store.model, store.dim) != (model, dim):
            raise _mismatch(root, store.manifest, model, dim)
        if repairs:
            store.write_manifest()
        for name, schema in ((IMAGES, image_schema(dim, model)), (FAILURES, failure_schema())):
            repair = store._ensure_table(name, schema)
            if repair:
                repairs.append(repair)
        store.repairs = repairs
        return store

    def write_manifest(self, **updates: Any) -> None:
        self.manifest.update(updates)
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2))
        os.replace(tmp, self.root / MANIFEST)  # atomic: readers never see half a manifest

    def write_snapshot(self) -> None:
        """Record the file states of every row and failure (call after a complete write)."""
        rows = {p: [s.size, s.mtime_ns] for p, s in self.file_states().items()}
        failures = {p: [f["size"], f["mtime_ns"], f["reason"]] for p, f in self.failures().items()}
        tmp = self.root / (SNAPSHOT + ".tmp")
        tables = table_fingerprint(self.root)
        tmp.write_text(json.dumps({"rows": rows, "failures": failures, "tables": tables}))
        os.replace(tmp, self.root / SNAPSHOT)
        self._snapshot_dropped = False  # the next write through this Store drops it again

    def _drop_snapshot(self) -> None:
        """Before any change: a snapshot must never describe a table it does not match."""
        if not self._snapshot_dropped:
            (self.root / SNAPSHOT).unlink(missing_ok=True)
            # The vector cache and ANN index too (beside the version checks that guard them).
            (search_cache_dir(self.root) / VECTOR_CACHE).unlink(missing_ok=True)
            (search_cache_dir(self.root) / ANN_POINTER).unlink(missing_ok=True)
            self._snapshot_dropped = True

    # ------------------------------------------------------------------ tables

    @property
    def images(self):
        return self._table(IMAGES)

    @property
    def failures_table(self):
        return self._table(FAILURES)

    def _table(self, name: str):
        try:
            return self._db.open_table(name)
        except (OSError, ValueError, RuntimeError) as e:
            raise _damaged(
                self.root, f"its table {name} cannot be opened ({_first_line(e)})"
            ) from e

    def count(self) -> int:
        with self._reading(IMAGES):
            return self.images.count_rows()

    @contextmanager
    def _reading(self, name: str) -> Iterator[None]:
        """Lance errors while reading a table (a data file gone) become IndexDamaged."""
        try:
            yield
        except (OSError, ValueError, RuntimeError) as e:
            raise _damaged(self.root, f"its table {name} cannot be read ({_first_line(e)})") from e

    def _scan(self, table, columns: list[str]):
        with self._reading(table.name):
            n = table.count_rows()
            if n == 0:
                import pyarrow as pa

                return pa.table({c: [] for c in columns})
            return table.search().select(columns).limit(n).to_arrow()

    def _create_table(self, name: str, schema) -> None:
        self._db.create_table(name, schema=schema, exist_ok=True)

    def _ensure_table(self, name: str, schema) -> str | None:
        """Create a missing table; move an unreadable one aside first. What was done, or
        None when the table is sound."""
        folder = self.root / f"{name}.lance"
        if not folder.exists():
            self._create_table(name, schema)
            return f"table {name} was missing: created again"
        try:
            self._scan(self._table(name), ["id"])  # reads every data file's id column
            return None
        except IndexDamaged as e:
            aside = folder.with_name(f"{folder.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(folder, aside)
            self._create_table(name, schema)
            return f"{e.damage}: moved to {aside.name}, created again"

    def file_states(self) -> dict[str, FileState]:
        """path -> (id, size, mtime, hash) for every row: what incremental indexing compares."""
        t = self._scan(self.images, ["id", "path", "size", "mtime_ns", "hash"]).to_pydict()
        return {
            p: FileState(i, s, m, h)
            for i, p, s, m, h in zip(
                t["id"], t["path"], t["size"], t["mtime_ns"], t["hash"], strict=True
            )
        }

    def vectors_for_hashes(self, hashes: Iterable[str]) -> dict[str, tuple[list, int, int]]:
        """hash -> (vector, width, height) already stored: moved or copied files reuse them."""
        wanted = sorted(set(hashes))
        found: dict[str, tuple[list, int, int]] = {}
        for chunk in _chunks(wanted, 500):
            where = "hash IN (" + ",".join(f"'{h}'" for h in chunk) + ")"
            t = (
                self.images.search()
                .where(where)
                .select(["hash", "vector", "width", "height"])
                .limit(len(chunk) * 64)
                .to_arrow()
                .to_pylist()
            )
            found.update((r["hash"], (r["vector"], r["width"], r["height"])) for r in t)
        return found

    def upsert(self, rows: list[dict]) -> None:
        if not rows:
            return
        import pyarrow as pa

        self._drop_snapshot()
        data = pa.Table.from_pylist(rows, schema=image_schema(self.dim))
        (
            self.images.merge_insert("id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(data)
        )

    def images_dataset(self):
        """The images table as a Lance dataset (pylance), for writers in other processes
        that add fragments to it (`grape_cli.ray_engine`)."""
        import lance

        return lance.dataset(str(self.root / f"{IMAGES}.lance"))

    def commit_fragments(self, fragments: list[str], replace_ids: list[str]) -> None:
        """Add fragments written elsewhere (`lance.fragment.write_fragments`, metadata as
        JSON) to the images table in one commit that also deletes the stored rows with
        `replace_ids`: an upsert as atomic as `upsert`, whose rows never pass through here."""
        import lance
        from lance.fragment import FragmentMetadata

        self._drop_snapshot()
        dataset = self.images_dataset()
        updated, removed = [], []
        if replace_ids:
            where = "id IN (" + ",".join(f"'{i}'" for i in sorted(set(replace_ids))) + ")"
            hits = dataset.to_table(columns=["id"], filter=where, with_row_address=True)
            for fragment_id in sorted({a >> 32 for a in hits["_rowaddr"].to_pylist()}):
                meta = dataset.get_fragment(fragment_id).delete(where)  # a deletion vector
                if meta is None:
                    removed.append(fragment_id)
                else:
                    updated.append(meta)
        op = lance.LanceOperation.Update(
            removed_fragment_ids=removed,
            updated_fragments=updated,
            new_fragments=[FragmentMetadata.from_json(f) for f in fragments],
        )
        lance.LanceDataset.commit(dataset.uri, op, read_version=dataset.version)

    def delete_ids(self, ids: Iterable[str], table: str = IMAGES) -> None:
        tbl = self._db.open_table(table)
        ids = sorted(ids)
        if ids:
            self._drop_snapshot()
        for chunk in _chunks(ids, 500):
            tbl.delete("id IN (" + ",".join(f"'{i}'" for i in chunk) + ")")

    def failures(self) -> dict[str, dict]:
        t = self._scan(self.failures_table, ["path", "size", "mtime_ns", "reason"]).to_pylist()
        return {r["path"]: r for r in t}

    def record_failures(self, rows: list[dict]) -> None:
        """rows: {path, size, mtime_ns, reason}; replaces earlier failures of the same path."""
        if not rows:
            return
        import pyarrow as pa

        self._drop_snapshot()
        data = pa.Table.from_pylist(
            [{**r, "id": path_id(r["path"])} for r in rows], schema=failure_schema()
        )
        (
            self.failures_table.merge_insert("id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(data)
        )

    def clear_failures(self, paths: Iterable[str]) -> None:
        self.delete_ids((path_id(p) for p in paths), FAILURES)

    def compact(self) -> None:
        """Merge the many small commits of an indexing run; drop versions over 10 minutes old
        (younger ones may still be read by a concurrent `grape search`)."""
        from datetime import timedelta

        for name in (IMAGES, FAILURES):
            self._db.open_table(name).optimize(cleanup_older_than=timedelta(minutes=10))

    # ------------------------------------------------------------------ reading

    def load_matrix(self, columns: tuple[str, ...] = ("path",)):
        """(metadata dict of lists, float32 matrix N x dim) of every image, in one read."""
        import numpy as np

        t = self._scan(self.images, [*columns, "vector"])
        if t.num_rows == 0:
            return {c: [] for c in columns}, np.zeros((0, self.dim), dtype=np.float32)
        flat = t.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False)
        matrix = np.ascontiguousarray(flat.reshape(t.num_rows, self.dim), dtype=np.float32)
        return {c: t.column(c).to_pylist() for c in columns}, matrix

    def read_columns(self, columns: tuple[str, ...]) -> dict[str, list]:
        """Metadata columns of every image, in table order (no vectors)."""
        t = self._scan(self.images, list(columns))
        return {c: t.column(c).to_pylist() for c in columns}

    def has_vector_index(self) -> bool:
        """Whether the images table carries an ANN index on its vectors."""
        try:
            return any("vector" in (ix.columns or []) for ix in self.images.list_indices())
        except Exception:  # an older table layout: searched exactly instead
            return False

    def ann_search(self, vectors, k: int, rows: dict[str, int], exact: bool = False):
        """(scores, rows) of each vector's top k by cosine through LanceDB (its ANN index
        when the table has one, unless `exact`); `rows` maps paths to the caller's rows."""
        import numpy as np

        k = min(k, len(rows))
        scores = np.full((len(vectors), k), -np.inf, dtype=np.float32)
        ids = np.full((len(vectors), k), -1, dtype=np.int64)
        for i, vec in enumerate(vectors):
            query = self.images.search(np.asarray(vec, dtype=np.float32))
            if exact:
                query = query.bypass_vector_index()
            t = (
                query.distance_type("cosine")
                .select(["path", "_distance"])
                .limit(k)
                .to_arrow()
                .to_pydict()
            )
            n = len(t["path"])
            ids[i, :n] = [rows[p] for p in t["path"]]
            scores[i, :n] = 1.0 - np.asarray(t["_distance"], dtype=np.float32)
        return scores, ids

    def fingerprint(self) -> str:
        """Identifies this corpus (model + image contents), for runs tuned against it."""
        t = self._scan(self.images, ["hash"]).column("hash").to_pylist()
        h = hashlib.blake2b(self.model.encode(), digest_size=8)
        for item in sorted(t):
            h.update(item.encode())
        return h.hexdigest()

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())


REPAIR_HINT = (
    "run `grape index` on its folders with --index {root} to repair it "
    "(rows it can still read are kept)"
)


def _damaged(root: Path, what: str) -> IndexDamaged:
    e = IndexDamaged(f"index {root} is damaged: {what}", REPAIR_HINT.format(root=root))
    e.damage = what  # for the list of repairs
    return e


def _mismatch(root: Path, manifest: dict, model: str, dim: int) -> IndexMismatch:
    return IndexMismatch(
        f"index {root} was built with {manifest['model']} (dim {manifest['dim']}), "
        f"not {model} (dim {dim})",
        "leave out --model to use the index's model, pass another --index, "
        f"or delete {root} to rebuild",
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _new_manifest(model: str, dim: int) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "dim": dim,
        "created": _now(),
        "updated": _now(),
        "roots": [],
    }


def _create_beside(root: Path, manifest: dict) -> bool:
    """Build the index in a hidden folder beside `root`, then rename it to `root` (atomic).
    False when `root` appeared meanwhile (another process is creating it)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.creating-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        store = Store(tmp, manifest)
        store._create_tables()
        store.write_manifest()
        os.rename(tmp, root)  # fails if root is there, unless it is an empty folder
        return True
    except OSError:
        if not root.is_dir():
            raise
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link_manifest(root: Path, manifest: dict) -> bool:
    """Write the manifest into `root` unless one is there already: True if this did."""
    tmp = root / f"{MANIFEST}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    try:
        os.link(tmp, root / MANIFEST)  # atomic, and never over another process's
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links
        if (root / MANIFEST).exists():
            return False
        os.replace(tmp, root / MANIFEST)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def recover_manifest(root: Path, damage: IndexDamaged) -> dict:
    """A manifest rebuilt from the images table, which records its model since grape
    0.2; IndexDamaged, with what to do, when it cannot be."""
    import lancedb

    db = lancedb.connect(str(root))
    try:
        table = db.open_table(IMAGES)
        meta = table.schema.metadata or {}
        roots = table.search().select(["root"]).limit(table.count_rows() or 1).to_arrow()
    except (OSError, ValueError, RuntimeError):
        meta, roots = {}, None
    model, dim = meta.get(b"grape.model"), meta.get(b"grape.dim")
    if model is None or dim is None:
        found = "its images table does not record" if roots is not None else "no table records"
        raise IndexDamaged(
            f"{damage.message}, and {found} the model",
            f"restore {root / MANIFEST} from a backup, or move {root} away and index again "
            "(grape does not guess the model of stored embeddings)",
        ) from None
    manifest = _new_manifest(model.decode(), int(dim))
    manifest["roots"] = sorted(set(roots.column("root").to_pylist()))
    return manifest


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
