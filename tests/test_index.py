"""`grape index`: rows, incremental re-indexing, bad input, locking, kill-and-resume."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grape_cli.embed import content_hash, decode_image
from grape_cli.errors import IndexLocked, IndexMismatch
from grape_cli.index import index_folders, index_info
from grape_cli.models import load_clip
from grape_cli.store import Store, path_id, read_snapshot


def index(roots, idx, model=None, **kw):
    kw.setdefault("workers", 0)  # in-process decoding: the worker path has its own tests
    return index_folders([roots] if isinstance(roots, (str, Path)) else roots, idx, model, **kw)


def rows(idx) -> dict[str, dict]:
    """path -> row (vector as a numpy array) of every image in the index."""
    store = Store.open(idx)
    meta, matrix = store.load_matrix(("id", "path", "hash", "size", "mtime_ns", "width", "height"))
    out = {}
    for i, path in enumerate(meta["path"]):
        out[path] = {c: meta[c][i] for c in meta} | {"vector": matrix[i]}
    assert len(out) == len(meta["path"]), "duplicate paths in the index"
    return out


def encode_file(clip, path) -> np.ndarray:
    """What the index should hold for `path`, computed without the indexer."""
    img, _ = decode_image(str(path), clip.image_size)
    return clip.encode_images(clip.preprocess(img)[None])[0].numpy()


def touch_later(path, seconds: float = 10.0):
    """Move mtime on, as between real edits: a rewrite of the same size within one mtime
    tick is invisible to (size, mtime) change detection."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))


def save_random(path, seed: int, size=(64, 48)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_images(folder, n: int, seed: int, prefix: str = "img"):
    folder.mkdir(parents=True, exist_ok=True)
    return [save_random(folder / f"{prefix}_{i:03d}.jpg", seed * 1000 + i) for i in range(n)]


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return load_clip(str(tiny_clip), device="cpu")


# ------------------------------------------------------------------ rows and model


def test_rows_hold_what_each_file_contains(photos, tmp_path, tiny_clip, clip):
    idx = tmp_path / "idx"
    s = index(photos, idx, str(tiny_clip), workers=2, batch_size=5)  # odd batches, 2 workers
    assert (s.added, s.encoded, s.updated, s.removed, s.failed) == (16, 16, 0, 0, [])
    r = rows(idx)
    files = sorted(str(p) for p in photos.rglob("*") if p.is_file())
    assert sorted(r) == files
    for path in files:
        row = r[path]
        assert row["id"] == path_id(path)
        assert row["hash"] == content_hash(path)
        assert (row["size"], row["mtime_ns"]) == (os.stat(path).st_size, os.stat(path).st_mtime_ns)
        assert (row["width"], row["height"]) == (64, 48)
        # Each row holds its own file's embedding: no mix-up across batches or workers.
        np.testing.assert_allclose(row["vector"], encode_file(clip, path), atol=1e-5)
    info = index_info(idx)
    assert (info["model"], info["dim"], info["images"], info["failures"]) == (
        str(tiny_clip),
        32,
        16,
        0,
    )
    assert info["roots"] == [str(photos)]


def test_model_mismatch_refused_naming_both(photos, tmp_path, tiny_clip, tiny_clip_b, cli):
    idx = tmp_path / "idx"
    index(photos, idx, str(tiny_clip))
    before = rows(idx)
    with pytest.raises(IndexMismatch) as e:
        index(photos, idx, str(tiny_clip_b))
    assert str(tiny_clip) in str(e.value) and str(tiny_clip_b) in str(e.value)
    write_images(photos, 2, seed=9, prefix="new")  # work that must not be done
    r = cli("index", photos, "--index", idx, "--model", tiny_clip_b)
    assert r.exit_code == IndexMismatch.exit_code == 4
    assert str(tiny_clip) in r.stderr and str(tiny_clip_b) in r.stderr
    assert "leave out --model" in r.stderr
    assert rows(idx).keys() == before.keys()
    # Without --model the index's own model is used; naming it again is fine too.
    assert index(photos, idx).added == 2
    assert index(photos, idx, f"local-dir:{tiny_clip}").unchanged == 18


# ------------------------------------------------------------------ incremental


def test_incremental_add_change_delete_move_copy(photos, tmp_path, tiny_clip, clip):
    idx = tmp_path / "idx"
    index(photos, idx, str(tiny_clip))
    before = rows(idx)
    again = index(photos, idx)
    assert (again.unchanged, again.added, again.encoded) == (16, 0, 0)

    added = save_random(photos / "added.png", seed=100)
    changed = photos / "img_001.jpg"
    save_random(changed, seed=101)
    touch_later(changed)
    deleted = photos / "img_002.jpg"
    deleted.unlink()
    moved_from, moved_to = photos / "img_004.jpg", photos / "nested" / "renamed.jpg"
    os.rename(moved_from, moved_to)

    s = index(photos, idx)
    assert (s.added, s.updated, s.moved, s.removed, s.unchanged) == (1, 1, 1, 1, 13)
    assert s.encoded == 2  # the move reused its embedding
    r = rows(idx)
    assert len(r) == 16
    assert str(deleted) not in r and str(moved_from) not in r
    np.testing.assert_array_equal(r[str(moved_to)]["vector"], before[str(moved_from)]["vector"])
    assert r[str(moved_to)]["id"] == path_id(str(moved_to))
    assert r[str(moved_to)]["hash"] == before[str(moved_from)]["hash"]
    assert r[str(changed)]["hash"] == content_hash(changed) != before[str(changed)]["hash"]
    np.testing.assert_allclose(r[str(changed)]["vector"], encode_file(clip, changed), atol=1e-5)
    np.testing.assert_allclose(r[str(added)]["vector"], encode_file(clip, added), atol=1e-5)

    # A copy keeps its source: added, yet not encoded again.
    shutil.copy(photos / "img_005.jpg", photos / "copy.jpg")
    s = index(photos, idx)
    assert (s.added, s.moved, s.encoded, s.removed) == (1, 0, 0, 0)
    r = rows(idx)
    np.testing.assert_array_equal(
        r[str(photos / "copy.jpg")]["vector"], r[str(photos / "img_005.jpg")]["vector"]
    )


def test_unchanged_run_answers_from_the_snapshot(photos, tmp_path, tiny_clip, monkeypatch):
    import grape_cli.index as index_module

    idx = tmp_path / "idx"
    first = index(photos, idx, str(tiny_clip))
    snapshot = read_snapshot(idx)
    assert len(snapshot["rows"]) == 16 and snapshot["failures"] == {}

    def no_lancedb(*a, **k):
        raise AssertionError("opened LanceDB")

    monkeypatch.setattr(index_module.Store, "open", no_lancedb)
    s = index(photos, idx)
    assert (s.unchanged, s.added, s.encoded, s.failed) == (16, 0, 0, [])
    assert s.to_dict().keys() == first.to_dict().keys()
    touch_later(photos / "img_001.jpg")  # any change takes the full path
    with pytest.raises(AssertionError, match="opened LanceDB"):
        index(photos, idx)


def test_any_write_drops_the_snapshot(photos, tmp_path, tiny_clip, monkeypatch):
    """A snapshot never outlives the table it describes: a crash between a write and the
    end of the run, or another writer, leaves none, and the full path runs."""
    idx = tmp_path / "idx"
    index(photos, idx, str(tiny_clip))
    store = Store.open(idx)
    store.delete_ids([path_id(str(photos / "img_001.jpg"))])
    assert read_snapshot(idx) is None
    store.write_snapshot()
    store.delete_ids([path_id(str(photos / "img_002.jpg"))])  # the same Store, again
    assert read_snapshot(idx) is None
    s = index(photos, idx)
    assert (s.added, s.unchanged) == (2, 14)
    assert read_snapshot(idx) is not None

    save_random(photos / "late.png", seed=5)
    monkeypatch.setattr(Store, "compact", lambda self: 1 / 0)  # dies after its commits
    with pytest.raises(ZeroDivisionError):
        index(photos, idx)
    assert read_snapshot(idx) is None
    monkeypatch.undo()
    s = index(photos, idx)
    assert (s.added, s.unchanged) == (0, 17)


def test_keep_missing(photos, tmp_path, tiny_clip):
    idx = tmp_path / "idx"
    index(photos, idx, str(tiny_clip))
    (photos / "img_000.png").unlink()
    s = index(photos, idx, keep_missing=True)
    assert (s.removed, s.unchanged) == (0, 15)
    assert str(photos / "img_000.png") in rows(idx)
    s = index(photos, idx)
    assert s.removed == 1
    assert str(photos / "img_000.png") not in rows(idx)


def test_several_roots_in_one_index(tmp_path, tiny_clip):
    a, b, idx = tmp_path / "a", tmp_path / "b", tmp_path / "idx"
    write_images(a, 3, seed=1)
    write_images(b, 4, seed=2)
    index(a, idx, str(tiny_clip))
    s = index(b, idx)
    assert s.added == 4
    assert len(rows(idx)) == 7
    assert index_info(idx)["roots"] == sorted([str(a), str(b)])
    # A run over one root never removes the rows of another.
    (a / "img_001.jpg").unlink()
    assert index(b, idx).removed == 0
    assert len(rows(idx)) == 7
    s = index([a, b], idx)
    assert (s.removed, s.unchanged) == (1, 6)


def test_exclude_and_index_folder_inside_a_root(photos, tmp_path, tiny_clip, cli):
    idx = photos / "my-index"  # inside the folder being indexed
    idx.mkdir()
    save_random(idx / "stray.jpg", seed=3)
    r = cli(
        "index", photos, "--index", idx, "--model", tiny_clip,
        "--exclude", "*.png", "--exclude", "nested/deeper", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output + r.stderr
    summary = json.loads(r.stdout)
    paths = set(rows(idx))
    assert summary["added"] == len(paths) == 8  # 12 top-level images, 4 of them png
    assert all(p.endswith(".jpg") and "deeper" not in p and "my-index" not in p for p in paths)


def test_default_index_location_and_env_override(photos, tmp_path, tiny_clip, monkeypatch):
    s = index_folders([photos], None, str(tiny_clip), workers=0)
    assert s.index == str(tmp_path / "grape-home" / "index")  # GRAPE_HOME from conftest
    assert Store.exists(tmp_path / "grape-home" / "index")
    monkeypatch.setenv("GRAPE_INDEX", str(tmp_path / "elsewhere"))
    s = index_folders([photos], None, str(tiny_clip), workers=0)
    assert s.index == str(tmp_path / "elsewhere") and s.added == 16


# ------------------------------------------------------------------ decoding


def test_exif_orientation_and_gif_first_frame(tmp_path, tiny_clip, clip):
    folder, idx = tmp_path / "special", tmp_path / "idx"
    folder.mkdir()
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)  # 64 wide, 48 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    # The same decoded pixels, turned by hand and stored losslessly.
    with Image.open(folder / "rotated.jpg") as im:
        im.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    red = Image.new("RGB", (40, 40), (255, 0, 0))
    blue = Image.new("RGB", (40, 40), (0, 0, 255))
    red.save(folder / "anim.gif", save_all=True, append_images=[blue], duration=100)
    red.save(tmp_path / "red.png")
    blue.save(tmp_path / "blue.png")

    index(folder, idx, str(tiny_clip))
    r = rows(idx)
    rot = r[str(folder / "rotated.jpg")]
    assert (rot["width"], rot["height"]) == (48, 64)
    np.testing.assert_allclose(
        rot["vector"], encode_file(clip, tmp_path / "upright.png"), atol=1e-5
    )
    gif = r[str(folder / "anim.gif")]["vector"]
    np.testing.assert_allclose(gif, encode_file(clip, tmp_path / "red.png"), atol=1e-5)
    assert not np.allclose(gif, encode_file(clip, tmp_path / "blue.png"), atol=1e-3)


@pytest.mark.parametrize("slow_with", ["several", "one"])
def test_cpu_thread_picker_keeps_the_faster_thread_count(slow_with):
    import torch

    from grape_cli.embed import CpuThreadPicker

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        picker = CpuThreadPicker()

        def encode(x):  # as on busy cores (several threads slow) or idle ones (one slow)
            several = torch.get_num_threads() > 1
            time.sleep(0.03 if several == (slow_with == "several") else 0.0)
            return x * 2

        x = torch.arange(10.0)[:, None]
        torch.testing.assert_close(picker.run(encode, x), x * 2)  # slices kept in order
        want = 1 if slow_with == "several" else 2
        assert picker.chosen == want == torch.get_num_threads()
        torch.testing.assert_close(picker.run(encode, x), x * 2)
        assert torch.get_num_threads() == want  # decided once per run
        picker.restore()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def png_bomb(path, width=30000, height=30000):
    """A valid PNG header that claims 900 megapixels: Pillow refuses it at open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def make_bad_folder(folder) -> dict[str, str]:
    """One file of each bad kind (plus a good one); name -> expected reason fragment."""
    folder.mkdir(parents=True)
    save_random(folder / "good.jpg", seed=1)
    good = (folder / "good.jpg").read_bytes()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2)
    (folder / "text.jpg").write_text("this is a text file, not a photo\n" * 20)
    png_bomb(folder / "bomb.png")
    with open(os.path.join(os.fsencode(folder), b"bad\xffname.jpg"), "wb") as f:
        f.write(good)
    return {
        "zero.jpg": "empty file",
        "truncated.jpg": "truncated",
        "corrupt.png": "not an image",
        "text.jpg": "not an image",
        "bomb.png": "decompression bomb",
        "bad\ufffdname.jpg": "not valid UTF-8",
    }


def failed_by_name(summary: dict) -> dict[str, dict]:
    return {os.path.basename(f["path"]): f for f in summary["failed"]}


def test_each_bad_input_reported_and_not_retried_unless_changed(tmp_path, tiny_clip, cli):
    folder, idx = tmp_path / "bad", tmp_path / "idx"
    expected = make_bad_folder(folder)

    r = cli("index", folder, "--index", idx, "--model", tiny_clip, "--workers", "1", "--json")
    assert r.exit_code == 0, r.output + r.stderr  # bad files never stop the run
    s = json.loads(r.stdout)
    assert (s["added"], s["failed_count"]) == (1, len(expected))
    failed = failed_by_name(s)
    assert failed.keys() == expected.keys()
    for name, reason in expected.items():
        assert reason in failed[name]["reason"], (name, failed[name])
        assert failed[name]["new"] is True
    assert index_info(idx)["failures"] == len(expected)

    # Unchanged since they failed: listed again, not retried.
    r = cli("index", folder, "--index", idx, "--json")
    s = json.loads(r.stdout)
    assert (s["unchanged"], s["encoded"], s["failed_count"]) == (1, 0, len(expected))
    assert all(f["new"] is False for f in s["failed"])
    assert failed_by_name(s).keys() == expected.keys()

    # The human summary lists each with its reason, too.
    r = cli("index", folder, "--index", idx)
    assert f"{len(expected)} file(s) skipped" in r.stdout
    assert "decompression bomb" in r.stdout and "not retried" in r.stdout

    # Repaired: indexed, and its failure forgotten. Changed but still bad: retried.
    save_random(folder / "truncated.jpg", seed=2)
    touch_later(folder / "truncated.jpg")
    (folder / "text.jpg").write_text("still not a photo, but changed\n")
    touch_later(folder / "text.jpg")
    (folder / "zero.jpg").unlink()
    s = json.loads(cli("index", folder, "--index", idx, "--json").stdout)
    assert (s["added"], s["encoded"], s["removed"]) == (1, 1, 0)
    failed = failed_by_name(s)
    assert "truncated.jpg" not in failed and "zero.jpg" not in failed
    assert failed["text.jpg"]["new"] is True
    assert all(f["new"] is False for n, f in failed.items() if n != "text.jpg")
    assert index_info(idx)["failures"] == len(expected) - 2
    assert {os.path.basename(p) for p in rows(idx)} == {"good.jpg", "truncated.jpg"}


def test_file_that_turns_bad_loses_its_stale_row(photos, tmp_path, tiny_clip):
    idx = tmp_path / "idx"
    index(photos, idx, str(tiny_clip))
    victim = photos / "img_007.jpg"
    victim.write_bytes(b"\xff\xd8\xff garbage")
    touch_later(victim)
    s = index(photos, idx)
    assert [f["path"] for f in s.failed] == [str(victim)]
    assert str(victim) not in rows(idx) and len(rows(idx)) == 15


def test_unreadable_file_is_reported_simulated(photos, tmp_path, tiny_clip, monkeypatch):
    """Tests run as root here, where chmod 000 blocks nothing: fail the read instead."""
    import builtins

    import grape_cli.embed as embed_module

    victim = str(photos / "img_004.jpg")

    def open_denied(path, *args, **kwargs):
        if str(path) == victim:
            raise PermissionError(13, "Permission denied", path)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(embed_module, "open", open_denied, raising=False)
    idx = tmp_path / "idx"
    s = index(photos, idx, str(tiny_clip))  # read while decoding
    assert s.added == 15
    assert s.failed == [{"path": victim, "reason": "permission denied", "new": True}]
    shutil.copy(photos / "img_005.jpg", victim)  # now the size of a stored file:
    touch_later(victim)  # hashed up front as a possible copy, and that read fails
    s = index(photos, idx)
    assert (s.added, s.unchanged) == (0, 15)
    assert s.failed == [{"path": victim, "reason": "permission denied", "new": True}]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_reported(photos, tmp_path, tiny_clip):
    victim = photos / "img_004.jpg"
    os.chmod(victim, 0)
    s = index(photos, tmp_path / "idx", str(tiny_clip))
    assert s.added == 15
    assert s.failed == [{"path": str(victim), "reason": "permission denied", "new": True}]


# ------------------------------------------------------------------ one writer


def hold_lock(idx):
    fd = os.open(idx / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_concurrent_writer_refused(photos, tmp_path, tiny_clip, cli):
    idx = tmp_path / "idx"
    index(photos, idx, str(tiny_clip))
    before = rows(idx)
    write_images(photos, 3, seed=7, prefix="late")
    fd = hold_lock(idx)
    try:
        t0 = time.perf_counter()
        r = cli("index", photos, "--index", idx)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    assert r.exit_code == IndexLocked.exit_code == 5
    assert f"another grape process is writing to {idx}" in r.stderr
    assert "wait for it to finish" in r.stderr
    assert elapsed < 5  # at once: no model loaded, nothing walked
    assert rows(idx).keys() == before.keys()
    assert index(photos, idx).added == 3  # free again


# ------------------------------------------------------------------ real processes


N_MANY = 1000  # with a commit per row, a run lasts several seconds after start-up


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """Enough tiny JPEGs that a run with small commits takes a few seconds."""
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    for i in range(N_MANY):
        sub = folder / f"d{i // 250}"
        sub.mkdir(exist_ok=True)
        img = base.copy()
        img[i % 24, :, :] = i % 256  # every file distinct
        img[:, (i // 24) % 32, 0] = (i * 7) % 256
        Image.fromarray(img).save(sub / f"{i:05d}.jpg", quality=90)
    return folder


def start_index(folder, idx, tiny_clip, tmp_path, *extra):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRAPE_HOME": str(tmp_path / "home"),
        "PYTHONWARNINGS": "error::RuntimeWarning",  # e.g. a fork warning from LanceDB
    }
    cmd = [sys.executable, "-m", "grape_cli", "index", str(folder), "--index", str(idx)]
    cmd += ["--model", str(tiny_clip), "--batch-size", "2", "--commit-every", "1", "--json"]
    return subprocess.Popen(
        [*cmd, *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, like a job in a shell
    )


def wait_for_rows(proc, idx, at_least: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "grape index ended before it could be interrupted"
        if Store.exists(idx):
            n = Store.open(idx).count()
            if n >= at_least:
                return n
        time.sleep(0.02)
    raise AssertionError(f"no {at_least} rows committed in {timeout} s")


def snapshot(idx):
    store = Store.open(idx)
    meta, matrix = store.load_matrix(("id", "path", "hash", "width", "height"))
    assert len(set(meta["id"])) == len(meta["id"]), "duplicate ids"
    order = np.argsort(meta["path"])
    return {c: [meta[c][i] for i in order] for c in meta}, matrix[order]


@pytest.fixture
def reap():
    """Process groups to kill at teardown: the orphaned decode workers of a killed run."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


@pytest.mark.slow
def test_kill_and_resume_matches_a_single_run(many_images, tmp_path, tiny_clip, reap):
    idx = tmp_path / "killed"
    proc = start_index(many_images, idx, tiny_clip, tmp_path)
    reap.append(proc.pid)  # its own session: the group id is its pid
    try:
        committed = wait_for_rows(proc, idx, at_least=16)
        # While it runs, a second writer is refused and changes nothing.
        with pytest.raises(IndexLocked):
            index(many_images, idx)
        os.kill(proc.pid, signal.SIGKILL)  # the main process only: workers are orphaned
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left = Store.open(idx).count()
    assert committed <= left < N_MANY, "the kill must land mid-run"

    s = index(many_images, idx, workers=1)  # at once: a dead writer holds no lock
    assert (s.unchanged, s.added, s.failed) == (left, N_MANY - left, [])

    reference = tmp_path / "one-run"
    index(many_images, reference, str(tiny_clip), workers=1)
    meta_a, vec_a = snapshot(idx)
    meta_b, vec_b = snapshot(reference)
    assert meta_a == meta_b  # same paths, ids, hashes and sizes
    assert len(meta_a["path"]) == N_MANY
    np.testing.assert_allclose(vec_a, vec_b, atol=1e-5)
    assert index_info(idx)["failures"] == 0


def test_ctrl_c_stops_cleanly_keeping_committed_rows(many_images, tmp_path, tiny_clip, cli):
    """A real SIGINT to the main thread mid-run, in-process (a second process start-up
    would double this test's time); the kill test above covers a real subprocess."""
    import threading

    idx = tmp_path / "interrupted"
    running = {"cli": True}

    def on_sigint(signum, frame):  # only while the command runs: never hit pytest itself
        if running["cli"]:
            raise KeyboardInterrupt

    def interrupt_when_rows_committed():
        deadline = time.monotonic() + 60
        while running["cli"] and time.monotonic() < deadline:
            if Store.exists(idx) and Store.open(idx).count() >= 16:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return
            time.sleep(0.02)

    previous = signal.signal(signal.SIGINT, on_sigint)
    watcher = threading.Thread(target=interrupt_when_rows_committed, daemon=True)
    try:
        watcher.start()
        r = cli(
            "index", many_images, "--index", idx, "--model", tiny_clip, "--workers", "1",
            "--batch-size", "2", "--commit-every", "1", "--json",
        )  # fmt: skip
    finally:
        running["cli"] = False
        signal.signal(signal.SIGINT, previous)
        watcher.join()
    assert r.exit_code == 130, r.output + r.stderr
    assert "interrupted" in r.stderr and "run the same command again" in r.stderr
    kept = Store.open(idx).count()
    assert 16 <= kept < N_MANY
    s = index(many_images, idx, workers=1)
    assert (s.unchanged, s.added) == (kept, N_MANY - kept)
