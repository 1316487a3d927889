"""Hostile files, damaged indexes and odd names: no hang, no unbounded memory, no traceback."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grape_cli.embed import FileTooLarge, NotRegularFile, content_hash, decode_image, read_file
from grape_cli.errors import IndexDamaged, IndexMismatch, InputError
from grape_cli.index import index_folders, index_info
from grape_cli.store import MANIFEST, SNAPSHOT, Store, read_snapshot

ESC = "\x1b"


def index(root, idx, model=None, **kw):
    kw.setdefault("workers", 0)
    return index_folders([root], idx, model, **kw)


def save_random(path, seed: int, size=(40, 30)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def good_folder(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        save_random(folder / f"ok_{i}.jpg", seed=i)
    return folder


def reasons(summary) -> dict[str, str]:
    return {os.path.basename(f["path"]): f["reason"] for f in summary.failed}


def lock_is_free(idx: Path) -> bool:
    fd = os.open(idx / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def in_thread(fn, timeout: float, unblock=None):
    """fn() in a thread; a hang fails the test (after `unblock()` frees it) instead of
    hanging the suite."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    hung = t.is_alive()
    if hung and unblock is not None:
        unblock()
        t.join(30)
    assert not hung, f"did not finish in {timeout} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


# ------------------------------------------------------------------ files that are not files


@pytest.mark.parametrize("workers", [0, 1])
def test_fifo_named_like_an_image_is_skipped_not_opened(tmp_path, tiny_clip, workers):
    folder, idx = good_folder(tmp_path / "photos"), tmp_path / "idx"
    fifo = folder / "x.jpg"
    os.mkfifo(fifo)

    def unblock():  # a reader stuck in open() is released by a writer coming and going
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    s = in_thread(lambda: index(folder, idx, str(tiny_clip), workers=workers), 30, unblock)
    assert s.added == 3
    assert reasons(s) == {"x.jpg": "not a regular file (a FIFO)"}
    assert lock_is_free(idx)
    again = in_thread(lambda: index(folder, idx, workers=workers), 30, unblock)
    assert (again.unchanged, [f["new"] for f in again.failed]) == (3, [False])


def test_socket_and_device_links_are_skipped(tmp_path, tiny_clip):
    folder, idx = good_folder(tmp_path / "photos"), tmp_path / "idx"
    os.symlink("/dev/zero", folder / "z.png")  # read it and memory grows without bound
    os.symlink("/dev/null", folder / "n.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "s.png"))
    try:
        s = in_thread(lambda: index(folder, idx, str(tiny_clip)), 30)
    finally:
        sock.close()
    assert s.added == 3
    assert reasons(s) == {
        "z.png": "not a regular file (a character device)",
        "n.jpg": "not a regular file (a character device)",
        "s.png": "not a regular file (a socket)",
    }
    assert index_info(idx)["failures"] == 3


def test_reads_refuse_what_is_not_a_regular_file_and_are_bounded(tmp_path):
    """The walker's check can be raced (a file swapped for a link after the walk): the
    readers check again, on the file they opened, and never read past a limit."""
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        for reader in (read_file, content_hash, decode_image):  # decode_image: --image
            with pytest.raises(NotRegularFile):
                in_thread(lambda p=path, r=reader: r(p), 10)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 5000)
    with pytest.raises(FileTooLarge, match="limit"):
        read_file(str(big), max_bytes=4096)
    with pytest.raises(FileTooLarge):
        content_hash(str(big), max_bytes=4096)
    assert read_file(str(big), max_bytes=5000) == b"\xff" * 5000
    assert content_hash(str(big)) == content_hash(str(big), max_bytes=5000)


def test_fifo_as_the_query_image_fails_at_once(tmp_path, tiny_clip, photos, cli):
    idx, fifo = tmp_path / "idx", tmp_path / "query.jpg"
    assert cli("index", photos, "--index", idx, "--model", tiny_clip).exit_code == 0
    os.mkfifo(fifo)

    def unblock():
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    r = in_thread(lambda: cli("search", "--image", fifo, "--index", idx), 30, unblock)
    assert r.exit_code == InputError.exit_code, r.output
    assert f"cannot read image {fifo}: not a regular file" in r.stderr


def test_file_over_the_size_limit_is_skipped_with_reason(tmp_path, tiny_clip):
    folder, idx = good_folder(tmp_path / "photos"), tmp_path / "idx"
    save_random(folder / "huge.png", seed=9, size=(400, 400))
    limit = max(os.path.getsize(p) for p in folder.glob("ok_*")) + 1
    s = index(folder, idx, str(tiny_clip), max_file_bytes=limit)
    assert s.added == 3
    assert "file too large" in reasons(s)["huge.png"]


# ------------------------------------------------------------------ a decode that never ends


def slow_decode(path, draft_size=None):
    """A decoder that stalls on one file, as a pathological image can."""
    data = path.getvalue() if hasattr(path, "getvalue") else b""
    if data.startswith(b"\x89PNG"):  # the slow one is the only PNG
        time.sleep(20)
    return decode_image(path, draft_size)


@pytest.mark.parametrize("workers", [0, 1])
def test_slow_decode_is_given_up_after_the_limit(tmp_path, tiny_clip, workers):
    folder, idx = good_folder(tmp_path / "photos"), tmp_path / "idx"
    save_random(folder / "slow.png", seed=5)
    t0 = time.perf_counter()
    # In this thread: with no workers the decode runs here, and only the main thread of a
    # process can take the alarm.
    s = index(folder, idx, str(tiny_clip), workers=workers, decode_timeout=0.3, decode=slow_decode)
    assert time.perf_counter() - t0 < 15
    assert s.added == 3
    assert reasons(s) == {"slow.png": "gave up: decoding took over 0.3 s"}
    assert lock_is_free(idx)


def test_decode_deadline_leaves_no_alarm_behind():
    import signal

    from grape_cli.embed import deadline

    before = signal.getsignal(signal.SIGALRM)
    with deadline(5.0):
        pass
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    assert signal.getsignal(signal.SIGALRM) is before
    with pytest.raises(Exception, match="gave up"), deadline(0.05):
        time.sleep(5)
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    # Off the main thread no alarm can be set: the work runs without a deadline.
    assert in_thread(lambda: _run_in_deadline(0.05), 10) == "done"


def _run_in_deadline(seconds):
    from grape_cli.embed import deadline

    with deadline(seconds):
        time.sleep(0.1)
    return "done"


# ------------------------------------------------------------------ names that look like markup


MARKUP = "bad[/x].png"
ESCAPED = f"e{ESC}[31mred.jpg"


def odd_names_folder(folder: Path) -> Path:
    good_folder(folder, 2)
    (folder / "bad[").mkdir()  # a "/" cannot be in a name: bad[ is a folder
    (folder / MARKUP).write_bytes(b"not an image")
    (folder / ESCAPED).write_bytes(b"not an image either")
    (folder / "fine[bold].jpg").write_bytes(b"\xff\xd8 nope")
    return folder


def assert_clean(text: str) -> None:
    assert "Traceback" not in text
    assert ESC not in text, repr(text)


def test_odd_file_names_are_printed_as_plain_text(tmp_path, tiny_clip, cli):
    folder, idx = odd_names_folder(tmp_path / "photos[/x]"), tmp_path / "idx[/y]"
    for _ in range(2):  # a new failure, then a known one (another code path)
        r = cli("index", folder, "--index", idx, "--model", tiny_clip)
        assert r.exit_code == 0, r.output + r.stderr
        assert_clean(r.output + r.stderr)
        assert "3 file(s) skipped" in r.stdout
        assert MARKUP in r.stdout and "fine[bold].jpg" in r.stdout
        assert "e\\x1b[31mred.jpg" in r.stdout  # shown escaped, not sent to the terminal
    r = cli("info", "--index", idx)
    assert r.exit_code == 0
    assert_clean(r.output)
    flat = "".join(c for c in r.stdout if not c.isspace() and c != "│")  # undo wrapping
    assert f"{idx}" in flat and f"{folder}" in flat


def test_error_lines_print_names_as_plain_text(tmp_path, tiny_clip, cli, photos):
    idx = tmp_path / "idx"
    assert cli("index", photos, "--index", idx, "--model", tiny_clip).exit_code == 0
    cases = [
        (("search", "--index", idx, "--image", "nope[/x].png"), InputError, "nope[/x].png"),
        (("search", "cat", "--index", tmp_path / "idx[/x]"), None, "idx[/x]"),
        (("info", "--index", tmp_path / f"i{ESC}[2Jx"), None, "i\\x1b[2Jx"),
        (("eval", tmp_path / "pairs[/x].jsonl", "--index", idx), InputError, "pairs[/x].jsonl"),
    ]
    (tmp_path / "p[").mkdir()
    pairs = tmp_path / "p[/b].jsonl"
    pairs.write_text(json.dumps({"query": "q", "target": "nope[/x].jpg"}) + "\n")
    cases.append((("eval", pairs, "--index", idx, "--strict"), None, "nope[/x].jpg"))
    for args, error, shown in cases:
        r = cli(*args)
        assert r.exit_code != 0 and r.exit_code != 1, (args, r.exit_code, r.output)
        if error is not None:
            assert r.exit_code == error.exit_code
        assert_clean(r.output + r.stderr)
        assert "error:" in r.stderr and shown in r.stderr, (args, r.stderr)


def test_plain_shows_control_characters_escaped():
    from rich.text import Text

    from grape_cli.cli.render import plain

    assert isinstance(plain("a"), Text)
    assert plain("x[/y]\\").plain == "x[/y]\\"
    assert plain(f"a{ESC}[31mb\x9b\x07\r\u202ec").plain == "a\\x1b[31mb\\x9b\\x07\\r\\u202ec"
    assert plain("bad\udcffname").plain == "bad\\udcffname"
    assert plain("two\nlines").plain == "two\\nlines"
    assert plain("two\nlines", keep_newlines=True).plain == "two\nlines"
    assert plain(Path("/p/[x]")).plain == "/p/[x]"


@pytest.mark.slow  # a whole process start-up: several seconds
def test_odd_names_in_a_real_grape_process(tmp_path, tiny_clip):
    folder, idx = odd_names_folder(tmp_path / "photos"), tmp_path / "idx"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRAPE_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "grape_cli", "index", str(folder), "--index", str(idx)]
    r = subprocess.run(
        [*cmd, "--model", str(tiny_clip), "--workers", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert_clean(r.stdout + r.stderr)
    assert MARKUP in r.stdout and "e\\x1b[31mred.jpg" in r.stdout


# ------------------------------------------------------------------ damaged indexes


@pytest.fixture
def built(tmp_path, tiny_clip):
    folder, idx = good_folder(tmp_path / "photos", 5), tmp_path / "idx"
    (folder / "broken.jpg").write_bytes(b"nope")
    index(folder, idx, str(tiny_clip))
    return folder, idx


def vectors(idx) -> dict[str, np.ndarray]:
    meta, matrix = Store.open(idx).load_matrix(("path",))
    assert len(set(meta["path"])) == len(meta["path"])
    return dict(zip(meta["path"], matrix, strict=True))


def assert_damage_reported(cli, idx, what: str):
    pairs = idx.parent / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "q", "target": "photos/ok_0.jpg"}) + "\n")
    for args in (
        ("search", "cat", "--index", idx),
        ("info", "--index", idx),
        ("eval", pairs, "--index", idx),
    ):
        r = cli(*args)
        assert r.exit_code == IndexDamaged.exit_code, (args, r.output, r.exception)
        assert "Traceback" not in r.output + r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 2, r.stderr  # the error and its hint
        assert f"index {idx} is damaged" in lines[0] and what in lines[0]
        assert "grape index" in lines[1]


def test_missing_images_table_reported_and_rebuilt(built, cli):
    folder, idx = built
    before = vectors(idx)
    shutil.rmtree(idx / "images.lance")
    assert (idx / SNAPSHOT).exists()  # and says all is well
    assert_damage_reported(cli, idx, "images")
    r = cli("index", folder, "--index", idx, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["added"], s["unchanged"]) == (5, 0)
    assert s["repaired"] and "images" in s["repaired"][0]
    after = vectors(idx)
    assert after.keys() == before.keys()
    for p, v in before.items():
        np.testing.assert_allclose(after[p], v, atol=1e-5)
    assert index_info(idx)["images"] == 5
    r = cli("index", folder, "--index", idx)
    assert r.exit_code == 0 and "repaired" not in r.stdout


def test_missing_failures_table_rebuilt_keeping_the_rows(built, cli):
    folder, idx = built
    shutil.rmtree(idx / "failures.lance")
    s = index(folder, idx)
    assert (s.unchanged, s.encoded, s.repaired != []) == (5, 0, True)
    assert reasons(s) == {"broken.jpg": "not an image (unidentified format)"}
    assert index_info(idx)["failures"] == 1


def test_a_table_that_cannot_be_read_is_set_aside_not_deleted(built):
    folder, idx = built
    data = idx / "images.lance" / "data"
    for f in data.iterdir():
        f.unlink()  # its rows are gone though its versions still list them
    with pytest.raises(IndexDamaged):
        Store.open(idx).load_matrix()
    s = index(folder, idx)
    assert (s.added, s.unchanged) == (5, 0)
    kept = [p.name for p in idx.iterdir() if p.name.startswith("images.lance.damaged")]
    assert len(kept) == 1
    assert len(vectors(idx)) == 5


def test_snapshot_is_not_trusted_over_the_tables(built, monkeypatch):
    folder, idx = built
    assert index(folder, idx).unchanged == 5  # the quick path, from the snapshot
    snap = json.loads((idx / SNAPSHOT).read_text())
    shutil.rmtree(idx / "images.lance")
    (idx / SNAPSHOT).write_text(json.dumps(snap))
    assert read_snapshot(idx) is None  # it no longer describes the tables there
    assert index(folder, idx).added == 5


@pytest.mark.parametrize("damage", ["corrupt", "missing", "not a dict"])
def test_damaged_manifest_recovered_from_the_tables(built, cli, tiny_clip, tiny_clip_b, damage):
    folder, idx = built
    before = vectors(idx)
    manifest = json.loads((idx / MANIFEST).read_text())
    if damage == "corrupt":
        (idx / MANIFEST).write_text('{"schema_version": 1, "model": ')
    elif damage == "missing":
        (idx / MANIFEST).unlink()
    else:
        (idx / MANIFEST).write_text("[]")
    assert_damage_reported(cli, idx, MANIFEST)
    r = cli("index", folder, "--index", idx, "--model", tiny_clip_b)
    assert r.exit_code == IndexMismatch.exit_code, r.output
    assert str(tiny_clip) in r.stderr
    s = index(folder, idx)  # no --model: the model recorded in the table
    assert (s.unchanged, s.encoded, s.model) == (5, 0, str(tiny_clip))
    assert s.repaired
    recovered = json.loads((idx / MANIFEST).read_text())
    for key in ("schema_version", "model", "dim", "roots"):
        assert recovered[key] == manifest[key], key
    after = vectors(idx)
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[p], v) for p, v in before.items())


def test_damaged_manifest_without_a_recorded_model_is_refused(built, tiny_clip):
    """Tables from before the model was recorded in them: refuse rather than guess."""
    import lancedb

    folder, idx = built
    db = lancedb.connect(str(idx))
    rows = db.open_table("images").to_arrow()
    db.drop_table("images")
    db.create_table("images", data=rows.replace_schema_metadata(None))  # as grape 0.1 made it
    (idx / MANIFEST).write_text("{")
    for model in (None, str(tiny_clip)):
        with pytest.raises(IndexDamaged) as e:
            index(folder, idx, model)
        assert "restore" in e.value.hint
    assert db.open_table("images").count_rows() == 5  # nothing thrown away


# ------------------------------------------------------------------ killed before the first write


def test_a_new_index_records_its_model_before_anything_else(tmp_path, tiny_clip, monkeypatch):
    import grape_cli.index as index_module

    folder, idx = good_folder(tmp_path / "photos"), tmp_path / "idx"

    def killed(*a, **k):  # a kill while the first run walks the folders
        raise KeyboardInterrupt

    monkeypatch.setattr(index_module, "walk_images", killed)
    with pytest.raises(KeyboardInterrupt):
        index(folder, idx, str(tiny_clip))
    monkeypatch.undo()
    assert json.loads((idx / MANIFEST).read_text())["model"] == str(tiny_clip)
    s = index(folder, idx)  # without --model: the model chosen at creation, not the default
    assert (s.model, s.added) == (str(tiny_clip), 3)


def test_an_empty_index_folder_is_a_new_index(tmp_path, tiny_clip):
    folder, idx = good_folder(tmp_path / "photos"), tmp_path / "idx"
    idx.mkdir()
    (idx / ".lock").touch()  # what a kill before the manifest would leave, at most
    s = index(folder, idx, str(tiny_clip))
    assert s.added == 3 and Store.exists(idx)
