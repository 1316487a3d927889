"""`grape index --engine ray`: the same index as the local engine, through crashes too.

The tests start one small local Ray cluster (2 CPUs) for the module and shut it down
after; an embedding actor and a driver are killed at set points, never by a timer race.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import ray
from PIL import Image
from ray import cloudpickle

from grape_cli import ray_engine, vectorcache
from grape_cli.embed import decode_image
from grape_cli.errors import ClusterError, IndexLocked, IndexMismatch, UsageError
from grape_cli.index import index_folders
from grape_cli.store import Store

from .conftest import write_images

# Helpers defined here run inside Ray workers, which cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

COUNTS = ("added", "updated", "moved", "removed", "unchanged", "encoded")


@pytest.fixture(scope="module")
def cluster():
    """A local cluster for the module; the engine finds it already initialised."""
    ray.init(
        num_cpus=2,
        object_store_memory=200 << 20,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def contents(idx):
    """(rows sorted by path, their vectors, failures) of an index; no duplicate ids."""
    store = Store.open(idx)
    columns = ("id", "path", "root", "hash", "size", "mtime_ns", "width", "height")
    meta, matrix = store.load_matrix(columns)
    assert len(set(meta["id"])) == len(meta["id"]), "duplicate ids"
    order = np.argsort(meta["path"])
    failures = {p: (f["size"], f["mtime_ns"], f["reason"]) for p, f in store.failures().items()}
    return {c: [meta[c][i] for i in order] for c in meta}, matrix[order], failures


def assert_same_index(a, b) -> None:
    meta_a, vectors_a, failures_a = contents(a)
    meta_b, vectors_b, failures_b = contents(b)
    assert meta_a == meta_b  # ids, paths, roots, hashes, sizes, mtimes, image sizes
    assert failures_a == failures_b
    np.testing.assert_allclose(vectors_a, vectors_b, atol=1e-5)


def counts(summary) -> dict:
    s = summary if isinstance(summary, dict) else summary.to_dict()
    failed = sorted((f["path"], f["reason"], f["new"]) for f in s["failed"])
    return {k: s[k] for k in COUNTS} | {"failed": failed}


def save_random(path, seed: int, size=(64, 48)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def touch_later(path, seconds: float = 10.0):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))


# ------------------------------------------------------------------ same index as local


def test_ray_index_equals_local_including_an_incremental_run(cluster, tmp_path, tiny_clip, cli):
    photos, local, on_ray = tmp_path / "photos", tmp_path / "local", tmp_path / "ray"
    write_images(photos, 30)
    write_images(photos / "nested", 6, seed=1, prefix="deep")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a photo")

    a = index_folders([photos], local, str(tiny_clip), workers=0)
    b = index_folders([photos], on_ray, str(tiny_clip), engine="ray", batch_size=8, commit_every=10)
    assert counts(b) == counts(a)
    assert b.added == 36 and len(b.failed) == 1
    assert_same_index(on_ray, local)
    assert {"decode_s", "embed_s", "write_s", "commit_s", "first_result_s"} <= b.stages.keys()
    assert vectorcache.is_current(on_ray, Store.read_manifest(on_ray))  # search cache fresh

    write_images(photos, 3, seed=5, prefix="added")
    changed = save_random(photos / "img_001.jpg", seed=101)
    touch_later(changed)
    (photos / "img_002.jpg").unlink()
    os.rename(photos / "img_004.jpg", photos / "nested" / "moved.jpg")
    touch_later(save_random(photos / "broken.jpg", seed=102))  # repaired: its failure goes

    a = index_folders([photos], local, workers=0)
    r = cli(
        "index", photos, "--index", on_ray, "--engine", "ray", "--ray-address", cluster,
        "--batch-size", "4", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output + r.stderr
    b = json.loads(r.stdout)
    assert counts(b) == counts(a)
    assert (b["added"], b["updated"], b["moved"], b["removed"]) == (4, 1, 1, 1)
    assert b["encoded"] == 5 and b["failed"] == []  # the moved file kept its stored vector
    assert_same_index(on_ray, local)
    assert Store.open(on_ray).failures() == {}
    assert vectorcache.is_current(on_ray, Store.read_manifest(on_ray))


# ------------------------------------------------------------------ crashes


def kill_once_after(batches: int, marker):
    """An `after_batch` hook: the first actor to finish its `batches`-th batch dies
    (SIGKILL, before returning it); the marker keeps its restarted self alive."""

    def hook(done: int) -> None:
        if done == batches and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def test_killed_embedding_actor_loses_nothing(cluster, tmp_path, tiny_clip):
    photos, local, on_ray = tmp_path / "photos", tmp_path / "local", tmp_path / "ray"
    write_images(photos, 40)
    marker = tmp_path / "actor-killed"

    s = index_folders(
        [photos], on_ray, str(tiny_clip), engine="ray", batch_size=4, commit_every=8,
        after_batch=kill_once_after(3, marker),
    )  # fmt: skip
    assert marker.exists(), "no actor was killed"
    assert int(marker.read_text()) != os.getpid()
    # Ray Data restarted the actor and retried its lost batch: nothing missing, nothing twice.
    assert (s.added, s.encoded, s.failed) == (40, 40, [])
    again = index_folders([photos], on_ray)
    assert (again.unchanged, again.added, again.encoded) == (40, 0, 0)
    index_folders([photos], local, str(tiny_clip), workers=0)
    assert_same_index(on_ray, local)


DRIVER = """
import sys, time
from grape_cli import ray_engine
from grape_cli.index import index_folders

photos, idx, model, address, marker = sys.argv[1:]
commit = ray_engine.RayRun._commit


def commit_then_stall(self, results, to_encode):
    commit(self, results, to_encode)
    if self.summary.encoded:  # rows committed: now wait for the kill
        open(marker, "w").close()
        time.sleep(600)


ray_engine.RayRun._commit = commit_then_stall
index_folders(
    [photos], idx, model, engine="ray", ray_address=address, batch_size=4, commit_every=4
)
"""


def test_killed_driver_resumes_without_duplicates(cluster, tmp_path, tiny_clip):
    photos, local, on_ray = tmp_path / "photos", tmp_path / "local", tmp_path / "ray"
    write_images(photos, 40)
    marker = tmp_path / "committed"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    proc = subprocess.Popen(
        [sys.executable, script, photos, on_ray, tiny_clip, cluster, marker],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        # Generous: on a loaded 2-core machine starting the driver's Ray job took over 120 s.
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the driver never committed"
            time.sleep(0.1)
        with pytest.raises(IndexLocked):  # one writer at a time, whatever the engine
            index_folders([photos], on_ray, engine="ray")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    kept = Store.open(on_ray).count()
    assert 4 <= kept < 40, "the kill must land mid-run"

    s = index_folders([photos], on_ray, engine="ray", batch_size=8)
    assert (s.unchanged, s.added, s.encoded, s.failed) == (kept, 40 - kept, 40 - kept, [])
    index_folders([photos], local, str(tiny_clip), workers=0)
    assert_same_index(on_ray, local)


# ------------------------------------------------------------------ bad files


def slow_decode(path, draft_size=None):
    """Stalls on PNGs (only slow.png here), as a pathological image can."""
    data = path.getvalue() if hasattr(path, "getvalue") else b""
    if data.startswith(b"\x89PNG"):
        time.sleep(20)
    return decode_image(path, draft_size)


def bad_folder(folder) -> int:
    """One file of each bad kind beside good ones; returns the size limit to index with."""
    folder.mkdir(parents=True)
    for i in range(4):
        save_random(folder / f"ok_{i}.jpg", seed=i)
    good = (folder / "ok_0.jpg").read_bytes()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "text.jpg").write_text("this is a text file, not a photo\n" * 20)
    save_random(folder / "slow.png", seed=9)
    os.mkfifo(folder / "fifo.jpg")
    limit = max(p.stat().st_size for p in folder.iterdir() if p.is_file()) + 1
    (folder / "huge.jpg").write_bytes(good + b"\0" * limit)
    return limit


def test_bad_files_fail_with_the_local_reasons(cluster, tmp_path, tiny_clip):
    folder, local, on_ray = tmp_path / "photos", tmp_path / "local", tmp_path / "ray"
    limit = bad_folder(folder)
    # 3 s, not less: under load a Ray worker's first decode of text.jpg once took over 0.5 s,
    # and the test then saw the deadline's reason instead of "not an image". slow.png
    # stalls 20 s, so the deadline still has to fire for it.
    kw = {"decode_timeout": 3.0, "max_file_bytes": limit, "decode": slow_decode}

    a = index_folders([folder], local, str(tiny_clip), workers=0, **kw)
    b = index_folders([folder], on_ray, str(tiny_clip), engine="ray", batch_size=4, **kw)
    assert counts(b) == counts(a)
    reasons = {os.path.basename(f["path"]): f["reason"] for f in b.failed}
    bad = {"zero.jpg", "truncated.jpg", "text.jpg", "huge.jpg", "slow.png", "fifo.jpg"}
    assert reasons.keys() == bad
    assert reasons["slow.png"] == "gave up: decoding took over 3 s"  # the deadline holds
    assert "file too large" in reasons["huge.jpg"]
    assert b.added == 4
    assert_same_index(on_ray, local)


# ------------------------------------------------------------------ refusals, no cluster


def test_model_mismatch_is_refused_before_ray_is_used(tmp_path, tiny_clip, tiny_clip_b, photos):
    idx = tmp_path / "idx"
    index_folders([photos], idx, str(tiny_clip), workers=0)

    def no_cluster(address):
        raise AssertionError("Ray was started")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray_engine, "connect", no_cluster)
        with pytest.raises(IndexMismatch):
            index_folders([photos], idx, str(tiny_clip_b), engine="ray")
    with pytest.raises(UsageError, match="unknown engine"):
        index_folders([photos], idx, engine="spark")


def test_unreachable_cluster_is_a_clear_error(monkeypatch):
    def refused(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(ClusterError) as e:
        ray_engine.connect("auto")
    assert e.value.exit_code == 9
    assert "cannot reach the Ray cluster at auto" in e.value.message
    assert "ray start --head" in e.value.hint


def test_a_failed_pipeline_names_its_cause():
    from grape_cli.errors import ModelError
    from grape_cli.ray_engine import _failure

    wrapped = RuntimeError("UDF failed to process a data block")
    wrapped.__cause__ = KeyError("vector")
    assert _failure(wrapped).message == "the Ray pipeline failed: KeyError: 'vector'"
    own = ModelError("could not load CLIP model x", "check the model spec")
    wrapped.__cause__ = own
    assert _failure(wrapped) is own  # a worker's own error, hint and all
    # An actor that died in its constructor: only the traceback's text is left.
    died = RuntimeError(
        "The actor died because of an error raised in its creation task\n"
        '  File "models.py", line 45, in pick_device\n'
        "grape_cli.errors.ModelError: --device cuda asked for, but CUDA is not available\n"
    )
    assert _failure(died).message.endswith(
        "grape_cli.errors.ModelError: --device cuda asked for, but CUDA is not available"
    )
