"""The folder walker: what is found, what is skipped, and that it always terminates."""

from __future__ import annotations

import os
import threading

import pytest

from grape_cli.walk import is_image_name, printable, walk_images


def touch(path, data: bytes = b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def walk_with_timeout(*args, timeout: float = 10.0, **kwargs):
    """walk_images in a thread: a loop in the walker fails the test instead of hanging it."""
    result = {}
    t = threading.Thread(target=lambda: result.update(out=walk_images(*args, **kwargs)))
    t.daemon = True
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "walk_images did not terminate"
    return result["out"]


def names(found):
    return sorted(os.path.basename(f.path) for f in found)


@pytest.mark.parametrize(
    "name, ok",
    [
        ("a.jpg", True),
        ("a.JPEG", True),
        ("a.png", True),
        ("a.webp", True),
        ("a.bmp", True),
        ("a.gif", True),
        ("a.tif", True),
        ("a.TIFF", True),
        ("a.heic", False),
        ("a.txt", False),
        ("jpg", False),
    ],
)
def test_image_extensions(name, ok):
    assert is_image_name(name) is ok


def test_recursive_sorted_with_stat(tmp_path):
    touch(tmp_path / "b.jpg", b"12345")
    touch(tmp_path / "sub" / "deeper" / "a.PNG")
    touch(tmp_path / "notes.txt")
    found, skipped = walk_images([tmp_path])
    assert [os.path.relpath(f.path, tmp_path) for f in found] == [
        "b.jpg",
        os.path.join("sub", "deeper", "a.PNG"),
    ]
    assert skipped == []
    b = found[0]
    assert b.root == str(tmp_path)
    assert b.size == 5
    assert b.mtime_ns == os.stat(tmp_path / "b.jpg").st_mtime_ns
    assert os.path.isabs(b.path)


def test_hidden_and_skip_dirs(tmp_path):
    touch(tmp_path / "keep.jpg")
    touch(tmp_path / ".hidden.jpg")
    touch(tmp_path / ".thumbs" / "t.jpg")
    touch(tmp_path / "index" / "images.lance" / "x.png")
    found, _ = walk_images([tmp_path], skip_dirs=[tmp_path / "index"])
    assert names(found) == ["keep.jpg"]


def test_exclude_by_name_and_relative_path(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.png")
    touch(tmp_path / "raw" / "c.jpg")
    touch(tmp_path / "2024" / "trip" / "d.jpg")
    touch(tmp_path / "2024" / "home" / "e.jpg")
    found, _ = walk_images([tmp_path], exclude=["*.png", "raw", "2024/trip"])
    assert names(found) == ["a.jpg", "e.jpg"]


def test_symlink_loop_terminates_and_linked_folder_is_walked_once(tmp_path):
    touch(tmp_path / "photos" / "a.jpg")
    touch(tmp_path / "photos" / "sub" / "b.jpg")
    os.symlink(tmp_path / "photos", tmp_path / "photos" / "sub" / "loop")  # to a parent
    os.symlink(tmp_path / "photos" / "sub", tmp_path / "photos" / "again")  # a sibling twice
    found, _ = walk_with_timeout([tmp_path / "photos"])
    assert names(found) == ["a.jpg", "b.jpg"]


def test_mutual_symlink_loop_between_roots(tmp_path):
    touch(tmp_path / "x" / "1.jpg")
    touch(tmp_path / "y" / "2.jpg")
    os.symlink(tmp_path / "y", tmp_path / "x" / "to_y")
    os.symlink(tmp_path / "x", tmp_path / "y" / "to_x")
    found, _ = walk_with_timeout([tmp_path / "x", tmp_path / "y"])
    assert names(found) == ["1.jpg", "2.jpg"]  # each file once, whichever root reached it


def test_same_root_twice_and_nested_root_list_each_file_once(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "sub" / "b.jpg")
    found, _ = walk_images([tmp_path, tmp_path, tmp_path / "sub"])
    assert names(found) == ["a.jpg", "b.jpg"]


def test_broken_symlink_is_reported(tmp_path):
    touch(tmp_path / "ok.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    found, skipped = walk_images([tmp_path])
    assert names(found) == ["ok.jpg"]
    assert [os.path.basename(s.path) for s in skipped] == ["dangling.jpg"]
    assert "cannot stat" in skipped[0].reason


def test_non_utf8_name_is_skipped_with_reason(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")  # Latin-1, not UTF-8
    with open(raw, "wb") as f:
        f.write(b"abc")
    found, skipped = walk_images([tmp_path])
    assert found == []
    (s,) = skipped
    assert s.reason == "file name is not valid UTF-8"
    assert s.size == 3
    s.path.encode("utf-8")  # storable: the bad byte became U+FFFD
    assert s.path.endswith("caf\ufffd.jpg")


def test_printable():
    assert printable("/a/b.jpg") == "/a/b.jpg"
    assert printable("/a/\udce9.jpg") == "/a/\ufffd.jpg"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_unreadable_folder_is_reported(tmp_path):
    touch(tmp_path / "locked" / "a.jpg")
    os.chmod(tmp_path / "locked", 0)
    try:
        _, skipped = walk_images([tmp_path])
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert [s.reason for s in skipped] == ["folder unreadable: Permission denied"]


def test_only_regular_files_are_listed(tmp_path):
    """A FIFO blocks whoever opens it; a link to /dev/zero never ends: skipped, with why."""
    touch(tmp_path / "ok.jpg")
    os.mkfifo(tmp_path / "fifo.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.png")
    os.symlink(tmp_path / "ok.jpg", tmp_path / "link.jpg")  # a link to a file is fine
    found, skipped = walk_with_timeout([tmp_path])
    assert names(found) == ["link.jpg", "ok.jpg"]
    assert {os.path.basename(s.path): s.reason for s in skipped} == {
        "fifo.jpg": "not a regular file (a FIFO)",
        "zero.png": "not a regular file (a character device)",
    }
