"""`grape index --engine ray`: the embedding phase of an indexing run as a Ray Data pipeline.

The driver (the `grape index` process) does what the local engine does before and after:
it holds the writer lock, walks the folders, compares them with the index, reuses the
stored vectors of moved files, and at the end records failures, removes what is gone,
compacts, and refreshes the search cache (`grape_cli.index._Run`). Only the files that
need embedding go through Ray, in three stages:

1. decode, as CPU tasks: each file is read, hashed and decoded by `grape_cli.embed`'s
   code (regular files only, bounded size, decode deadline, the same failure reasons),
   then resized and cropped; images travel as uint8 pixels, a quarter of the float
   tensor the model takes, and the actor finishes the preprocessing (ToTensor,
   Normalize: the same transforms on the same pixels, so the same vectors);
2. embed, in an actor pool, one model per actor (`num_gpus=1` each on a cluster with
   GPUs, CPU otherwise);
3. write, as tasks: each batch of vectors becomes a Lance fragment, written by the task
   straight into the images table's folder with `lance.fragment.write_fragments`
   (Lance's distributed write: data files only, nothing committed).

Why this write path. The table is keyed by `id`: a changed file's new row must replace
its old one, atomically, or a crash in between leaves duplicates. Ray Data's
`Dataset.write_lance` and the `lance-ray` package create, append or overwrite, nothing
else (an append gives a changed file a second row), and `write_lance` commits once, at
the end (a driver killed at 99 % keeps nothing); `lancedb-ray`, which has an upsert mode,
needs Python 3.12. So the workers write fragments, and only their metadata (a few
hundred bytes each) comes back to the driver, which commits every `commit_every` rows as
one Lance transaction (`Store.commit_fragments`): the new fragments plus deletion
vectors on the rows they replace, as LanceDB's merge_insert does for the local engine,
without any vector passing through the driver.

Crash safety. Ray Data restarts a dead embedding actor and retries its batch; a task
that dies is retried. A fragment written by an attempt whose result never came back is
never committed (only results the driver receives are), so it cannot duplicate a row;
it stays an unreferenced file, which Lance's cleanup (part of each run's compaction)
deletes once it is a week old. A driver killed mid-run keeps every commit made so far,
and the next run embeds only the rest, as with the local engine. Every commit also
deletes, from the fragments already in the table, any row with an id it adds, so even a
batch delivered twice would not duplicate.

Every node must be able to read the photo folders, the model (a local model folder, or
the Hub cache) and the index folder at the same paths: a shared file system.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from grape_cli.errors import ClusterError, GrapeError, UsageError
from grape_cli.index import _Run
from grape_cli.store import path_id

if TYPE_CHECKING:
    from grape_cli.walk import FoundFile

# ---------------------------------------------------------------------------- the cluster


def require_ray() -> None:
    """Fail at once, before any work, when the Ray engine's packages are missing."""
    import importlib.util

    missing = [m for m in ("ray", "lance") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"--engine ray needs {' and '.join(missing)} (Ray Data and pylance)",
            "pip install 'grape-cli[ray]', or use the default --engine local",
        )


def connect(address: str | None) -> bool:
    """Join the cluster at `address` ("auto": the one this machine belongs to), or start a
    local one when `address` is None (unless `ray.init` ran already in this process, or
    RAY_ADDRESS names one). True when this call started Ray, so the caller shuts it down."""
    require_ray()
    import ray

    if ray.is_initialized():
        return False
    # Ray's C++ core logs at ERROR that Ray Data's actors keep their constructor
    # arguments in the object store (ray-project/ray#53727), on every run: only a fatal
    # error of its own is worth a line on the user's terminal (all are in Ray's log files).
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    try:
        with warnings.catch_warnings():
            # Ray starts its services with fork + exec: nothing of LanceDB runs in them.
            warnings.filterwarnings("ignore", "lancedb fork support", RuntimeWarning)
            ray.init(
                address=address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,  # workers' output stays in Ray's logs; errors come back
            )
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address}: {_first_line(e)}"
            if address
            else f"cannot start a Ray cluster on this machine: {_first_line(e)}",
            "start one with `ray start --head`, or leave out --ray-address to run on this machine",
        ) from e
    return True


def _quiet_data_context():
    """Ray Data's progress bars and per-run banners would tear through grape's own bar."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    # Its errors too: a failure becomes one ClusterError (see `_failure`).
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    return ctx


def actor_settings(resources: dict) -> dict:
    """map_batches arguments of the embedding stage for a cluster with `resources`: one
    GPU per actor and up to one actor per GPU, else CPU actors for up to half the CPUs
    (the other half decodes).

    >>> actor_settings({"CPU": 16.0, "GPU": 4.0})
    {'num_gpus': 1, 'num_cpus': 1, 'pool': (1, 4)}
    >>> actor_settings({"CPU": 2.0})
    {'num_gpus': 0, 'num_cpus': 1, 'pool': (1, 1)}
    """
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return {"num_gpus": 1, "num_cpus": 1, "pool": (1, gpus)}
    return {"num_gpus": 0, "num_cpus": 1, "pool": (1, max(1, int(resources["CPU"]) // 2))}


def _model_memory(clip) -> int:
    """Bytes to reserve for one embedding actor: its weights twice over (loading copies
    them) plus room for activations."""
    weights = sum(p.numel() * p.element_size() for p in clip.model.parameters())
    return 2 * weights + (256 << 20)


def _failure(e: BaseException) -> GrapeError:
    """What a failed pipeline raises: the worker's own GrapeError when Ray kept it, else a
    ClusterError naming the exception that ended it."""
    inner, seen = e, set()
    while inner is not None and id(inner) not in seen:  # Ray wraps it once or twice
        seen.add(id(inner))
        if isinstance(inner, GrapeError):
            return inner
        cause = getattr(inner, "cause", None)
        inner = cause if isinstance(cause, BaseException) else inner.__cause__
        if inner is not None and not type(inner).__module__.startswith("ray."):
            if isinstance(inner, GrapeError):
                return inner
            return _cluster_error(f"{type(inner).__name__}: {_first_line(inner)}")
    # An actor that died in its constructor: Ray kept only the text of the traceback.
    lines = [line.strip() for line in _ANSI.sub("", str(e)).splitlines() if line.strip()]
    raised = [line for line in lines if _RAISED.match(line)]
    return _cluster_error((raised or lines or [type(e).__name__])[-1])


def _cluster_error(reason: str) -> ClusterError:
    return ClusterError(
        f"the Ray pipeline failed: {reason}",
        "rows committed so far are kept; fix the cause and run the same command again "
        "(Ray's logs: /tmp/ray/session_latest/logs on the head node)",
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*: ")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------- the stages


def split_preprocess(preprocess):
    """(on the decoding task, on the actor): open_clip's transforms cut before ToTensor,
    so that decode tasks send uint8 pixels; (preprocess, None) when they cannot be cut."""
    from torchvision import transforms as T

    steps = getattr(preprocess, "transforms", None)
    if not isinstance(preprocess, T.Compose) or steps is None:
        return preprocess, None
    cut = next((i for i, t in enumerate(steps) if isinstance(t, T.ToTensor)), None)
    if cut is None:
        return preprocess, None
    return T.Compose(steps[:cut]), T.Compose(steps[cut:])


def blank_pixels(head, image_size: int):
    """What `head` makes of an image, as an array: the shape and type of every image's
    pixels (open_clip's transforms always resize and crop to one size)."""
    import numpy as np
    from PIL import Image

    return np.asarray(head(Image.new("RGB", (image_size, image_size))))


def decode_stage(batch: dict, head, image_size: int, reading, blank) -> dict:
    """Read, hash and decode each file of the batch with `grape_cli.embed`'s per-file code;
    a failure is a row with `ok` False, its reason and blank pixels."""
    import numpy as np

    from grape_cli.embed import _ImageFiles

    t0 = time.perf_counter()
    files = _ImageFiles(list(batch["path"]), head, image_size, reading)
    items = [files[i] for i in range(len(files))]
    pixels = np.zeros((len(items), *blank.shape), dtype=blank.dtype)
    for i, it in enumerate(items):
        if it[1] is not None:
            pixels[i] = np.asarray(it[1])  # raises if a transform did not crop to size
    seconds = time.perf_counter() - t0
    return {
        **{k: batch[k] for k in ("pos", "id", "path", "root", "size", "mtime_ns")},
        "ok": np.array([it[1] is not None for it in items], dtype=bool),
        "reason": np.array([it[3] or "" for it in items], dtype=object),
        "hash": np.array([it[4] or "" for it in items], dtype=object),
        "width": np.array([it[2][0] for it in items], dtype=np.int32),
        "height": np.array([it[2][1] for it in items], dtype=np.int32),
        "pixels": pixels,
        "decode_s": np.full(len(items), seconds / max(1, len(items))),
    }


class Embedder:
    """The embedding stage: one model per actor, loaded once.

    `after_batch(n)` runs after the actor's n-th batch is embedded and before it is
    returned (a fault-injection point for tests: a crash there loses a whole batch)."""

    def __init__(self, spec, device, precision, tail, threads, after_batch=None):
        import torch

        from grape_cli.models import load_clip

        t0 = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        self.clip = load_clip(spec, device, precision)
        self.tail, self.after_batch, self.batches = tail, after_batch, 0
        self.init_s = time.perf_counter() - t0  # reported with the first batch

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        t0 = time.perf_counter()
        ok = batch["ok"]
        vectors = np.zeros((len(ok), self.clip.dim), dtype=np.float32)
        if ok.any():
            pixels = batch["pixels"][ok]
            x = (
                torch.stack([self.tail(p) for p in pixels])
                if self.tail is not None
                else torch.from_numpy(np.ascontiguousarray(pixels))
            )
            vectors[ok] = self.clip.encode_images(x).numpy()
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["vector"] = vectors
        out["embed_s"] = np.full(len(ok), (time.perf_counter() - t0) / max(1, len(ok)))
        out["actor_init_s"] = np.zeros(len(ok))
        out["actor_init_s"][:1] = self.init_s if self.batches == 0 else 0.0
        self.batches += 1
        if self.after_batch is not None:
            self.after_batch(self.batches)
        return out


def write_stage(batch: dict, uri: str, schema, storage_version: str | None, stable_ids: bool):
    """Write the batch's embedded rows as new Lance fragments (not committed); one result
    row: the fragments' metadata, the positions written, the failures and stage times."""
    import numpy as np
    import pyarrow as pa
    from lance.fragment import write_fragments

    t0 = time.perf_counter()
    ok = batch["ok"]
    fragments = []
    if ok.any():
        dim = batch["vector"].shape[1]
        names = ("id", "path", "root", "size", "mtime_ns", "hash", "width", "height")
        rows = {k: batch[k][ok] for k in names}
        flat = pa.array(np.ascontiguousarray(batch["vector"][ok]).reshape(-1), pa.float32())
        columns = {k: pa.array(list(v), schema.field(k).type) for k, v in rows.items()}
        columns["vector"] = pa.FixedSizeListArray.from_arrays(flat, dim)
        table = pa.table([columns[f.name] for f in schema], schema=schema)
        fragments = write_fragments(
            table,
            uri,
            schema=schema,
            data_storage_version=storage_version,  # as the table's other fragments
            enable_stable_row_ids=stable_ids,
        )
    return pa.Table.from_pydict(
        {
            "fragments": [[json.dumps(f.to_json()) for f in fragments]],
            "written": [batch["pos"][ok].tolist()],
            "failed": [batch["pos"][~ok].tolist()],
            "reasons": [[str(r) for r in batch["reason"][~ok]]],
            "decode_s": [float(np.sum(batch["decode_s"]))],
            "embed_s": [float(np.sum(batch["embed_s"]))],
            "actor_init_s": [float(np.sum(batch["actor_init_s"]))],
            "write_s": [time.perf_counter() - t0],
        }
    )


# ---------------------------------------------------------------------------- the run


class RayRun(_Run):
    """`_Run` with its embedding phase on Ray (see the module docstring).

    `device`/`precision` are the actors' (None: the best each node has); the driver's own
    copy of the model, on the CPU, only provides the preprocessing and, on a new index,
    the text tower for the search cache."""

    def __init__(self, *args, address=None, device=None, precision=None, after_batch=None):
        super().__init__(*args)
        self.address, self.device, self.precision = address, device, precision
        self.after_batch: Callable[[int], None] | None = after_batch
        self.stored_ids = {s.id for s in self.states.values()}  # rows a commit may replace
        self.done: set[int] = set()  # positions in the files to encode, results received
        self.counted: set[str] = set()  # paths in the summary
        self.stages: dict[str, float] = {}

    def _embed(self, to_encode: list[FoundFile], batch_size: int, workers) -> None:
        t0 = time.perf_counter()
        started = connect(self.address)
        try:
            self.stages["connect_s"] = time.perf_counter() - t0
            self.clip = self.load_model()
            self.stages["driver_model_s"] = time.perf_counter() - t0 - self.stages["connect_s"]
            self.progress.start(len(to_encode), "embedding")
            self._drain(self._pipeline(to_encode, batch_size), to_encode)
        finally:
            if started:
                import ray

                ray.shutdown()
        self.stages["total_s"] = time.perf_counter() - t0
        self.summary.stages = {k: round(v, 3) for k, v in self.stages.items()}

    def _pipeline(self, to_encode: list[FoundFile], batch_size: int):
        import ray

        _quiet_data_context()
        dataset = self.store.images_dataset()
        head, tail = split_preprocess(self.clip.preprocess)
        actors = actor_settings(ray.cluster_resources())
        lo, hi = actors["pool"]
        items = [
            {"pos": i, "id": path_id(f.path), "path": f.path, "root": f.root}
            | {"size": f.size, "mtime_ns": f.mtime_ns}
            for i, f in enumerate(to_encode)
        ]
        # One block of paths per batch: each decode task's output moves on as soon as it
        # is done (a task's output block is only handed on when the task ends).
        blocks = min(-(-len(items) // batch_size), 10_000)
        return (
            ray.data.from_items(items, override_num_blocks=blocks)
            .map_batches(
                decode_stage,
                fn_kwargs={
                    "head": head,
                    "image_size": self.clip.image_size,
                    "reading": self.reading,
                    "blank": blank_pixels(head, self.clip.image_size),
                },
                batch_size=batch_size,
                batch_format="numpy",
            )
            .map_batches(
                Embedder,
                fn_constructor_args=(
                    self.clip.spec,
                    self.device,
                    self.precision,
                    tail,
                    None if actors["num_gpus"] else actors["num_cpus"],
                    self.after_batch,
                ),
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                num_cpus=actors["num_cpus"],
                num_gpus=actors["num_gpus"],
                # Room for the model (it also keeps Ray Data from fusing the decode tasks
                # into the actors, which it does with operators of equal resources).
                memory=_model_memory(self.clip),
            )
            .map_batches(
                write_stage,
                fn_kwargs={
                    "uri": dataset.uri,
                    "schema": dataset.schema,
                    "storage_version": dataset.data_storage_version,
                    "stable_ids": bool(getattr(dataset, "has_stable_row_ids", False)),
                },
                batch_size=batch_size,
                batch_format="numpy",
                num_cpus=0.5,
            )
        )

    def _drain(self, results, to_encode: list[FoundFile]) -> None:
        """Commit the results as they come, every `commit_every` rows."""
        import ray

        pending: list[dict] = []
        t0 = time.perf_counter()
        try:
            for table in results.iter_batches(batch_size=None, batch_format="pyarrow"):
                for r in table.to_pylist():
                    self.stages.setdefault("first_result_s", time.perf_counter() - t0)
                    for k in ("decode_s", "embed_s", "write_s", "actor_init_s"):
                        self.stages[k] = self.stages.get(k, 0.0) + r[k]
                    if any(p in self.done for p in r["written"] + r["failed"]):
                        # A batch delivered twice (Ray Data guarantees it is not): commit
                        # what came before, so that its rows are replaced, never doubled.
                        self._commit(pending, to_encode)
                        pending = []
                    pending.append(r)
                    self.done.update(r["written"] + r["failed"])
                    self.progress.advance(len(r["written"]) + len(r["failed"]))
                    if sum(len(p["written"]) for p in pending) >= self.commit_every:
                        self._commit(pending, to_encode)
                        pending = []
        except ray.exceptions.RayError as e:
            raise _failure(e) from e
        self._commit(pending, to_encode)
        self.stages["pipeline_s"] = time.perf_counter() - t0
        if len(self.done) < len(to_encode):  # never expected; the next run would redo them
            raise ClusterError(
                f"the Ray pipeline returned no result for {len(to_encode) - len(self.done)} files",
                "rows committed so far are kept; run the same command again",
            )

    def _commit(self, results: list[dict], to_encode: list[FoundFile]) -> None:
        """One Lance transaction for these results; then the summary and the failures."""
        t0 = time.perf_counter()
        written = [to_encode[p] for r in results for p in r["written"]]
        fragments = [f for r in results for f in r["fragments"]]
        if fragments:
            ids = [path_id(f.path) for f in written]
            self.store.commit_fragments(fragments, [i for i in ids if i in self.stored_ids])
            self.stored_ids.update(ids)
            self.store.clear_failures([f.path for f in written if f.path in self.known_failures])
        summary, counted = self.summary, self.counted
        for f in written:
            if f.path in counted:
                continue
            counted.add(f.path)
            if f.path in self.states:
                summary.updated += 1
            else:
                summary.added += 1
            summary.encoded += 1
        for r in results:
            for p, reason in zip(r["failed"], r["reasons"], strict=True):
                if to_encode[p].path not in counted:
                    counted.add(to_encode[p].path)
                    self._fail(to_encode[p], reason)
        self.stages["commit_s"] = self.stages.get("commit_s", 0.0) + time.perf_counter() - t0
