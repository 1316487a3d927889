"""Find image files under folders: recursive, loop-safe, and never silent about a skip."""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class FoundFile:
    path: str
    root: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    """A file that looks like an image but cannot even be listed for indexing."""

    path: str
    size: int
    mtime_ns: int
    reason: str


def printable(path: str) -> str:
    """A path that can be stored and shown, even if its bytes are not valid UTF-8."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def not_regular_reason(mode: int) -> str | None:
    """Why a file of this st_mode cannot be read as a photo, or None for a regular file.
    Opening a FIFO blocks until a writer comes; a device such as /dev/zero never ends."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a file")
    return f"not a regular file ({kind})"


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_images(
    roots: Iterable[str | Path], exclude: Iterable[str] = (), skip_dirs: Iterable[str | Path] = ()
) -> tuple[list[FoundFile], list[Skipped]]:
    """Every image file under `roots`, sorted by path, plus what had to be skipped.

    Hidden files and folders are skipped; so are `skip_dirs` (the index itself). Folder
    symlinks are followed once: a (device, inode) seen before is not entered again, so a
    link to a parent cannot loop. `exclude` globs match the name or the path relative to
    its root.
    """
    exclude = list(exclude)
    skip = {os.path.realpath(p) for p in skip_dirs}
    found: list[FoundFile] = []
    skipped: list[Skipped] = []
    seen_dirs: set[tuple[int, int]] = set()
    for root in roots:
        root = os.path.abspath(os.path.expanduser(str(root)))
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                st = os.stat(folder)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen_dirs or os.path.realpath(folder) in skip:
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            try:
                entries = list(os.scandir(folder))
            except OSError as e:
                skipped.append(Skipped(printable(folder), 0, 0, f"folder unreadable: {e.strerror}"))
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                rel = os.path.relpath(entry.path, root)
                if any(fnmatch.fnmatch(entry.name, g) or fnmatch.fnmatch(rel, g) for g in exclude):
                    continue
                try:
                    if entry.is_dir():  # follows symlinks; loops are cut by seen_dirs
                        stack.append(entry.path)
                        continue
                except OSError:
                    continue
                if not is_image_name(entry.name):
                    continue
                try:
                    st = entry.stat()
                except OSError as e:  # a broken symlink, or a file gone since scandir
                    skipped.append(
                        Skipped(printable(entry.path), 0, 0, f"cannot stat: {e.strerror}")
                    )
                    continue
                reason = _skip_reason(entry.path, st.st_mode)
                if reason:
                    skipped.append(
                        Skipped(printable(entry.path), st.st_size, st.st_mtime_ns, reason)
                    )
                    continue
                found.append(FoundFile(entry.path, root, st.st_size, st.st_mtime_ns))
    found.sort(key=lambda f: f.path)
    return found, skipped


def _skip_reason(path: str, mode: int) -> str | None:
    """Why a file with an image name is not indexed, or None. Only regular files are read:
    opening a FIFO blocks forever, and a link to a device such as /dev/zero never ends."""
    reason = not_regular_reason(mode)
    if reason:
        return reason
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    return None
