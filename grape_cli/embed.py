"""Decode images in parallel workers and embed them, overlapping decode with the model."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from grape_cli.walk import not_regular_reason

if TYPE_CHECKING:
    import torch

    from grape_cli.models import ClipModel

_EXIF_ORIENTATION = 0x0112
# Larger than any photo Pillow agrees to decode (its pixel limit is about 179 MP, or about
# 1 GB as 16-bit RGB without compression), small enough that reading never exhausts RAM.
MAX_FILE_BYTES = 1 << 30
# A photo decodes in milliseconds; a file that takes this long is hostile or pathological.
DECODE_TIMEOUT_S = 30.0


class BadFile(Exception):
    """A file that is skipped for a reason of its own (the message is the reason)."""


class NotRegularFile(BadFile):
    pass


class FileTooLarge(BadFile):
    pass


class DecodeTimeout(BadFile):
    pass


def _nonblocking(path, flags):
    # Should the file be swapped for a FIFO after the check in _open_regular, open()
    # still returns at once; O_NOCTTY keeps a terminal from becoming ours.
    return os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY)


@contextmanager
def _open_regular(path: str, max_bytes: int) -> Iterator[tuple[BinaryIO, int]]:
    """(binary file, size) of a regular file no larger than `max_bytes`; anything else
    raises a BadFile without being read (nor opened, where the path shows it already)."""
    reason = not_regular_reason(os.stat(path).st_mode)
    if reason:
        raise NotRegularFile(reason)
    with open(path, "rb", opener=_nonblocking) as f:
        st = os.fstat(f.fileno())  # the file actually opened, whatever the path is now
        reason = not_regular_reason(st.st_mode)
        if reason:
            raise NotRegularFile(reason)
        if st.st_size > max_bytes:
            raise FileTooLarge(
                f"file too large ({_bytes(st.st_size)}; the limit is {_bytes(max_bytes)})"
            )
        yield f, st.st_size


def _bytes(n: int) -> str:
    """
    >>> _bytes(5000), _bytes(3_500_000), _bytes(1 << 30)
    ('5,000 bytes', '3.5 MB', '1.1 GB')
    """
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:,} bytes"


def read_file(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file, read no further than its size when opened."""
    with _open_regular(path, max_bytes) as (f, size):
        return f.read(size)


def _hasher():
    return hashlib.blake2b(digest_size=16)


def content_hash(path: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """blake2b of the file's bytes: finds moved and copied files without decoding them."""
    h = _hasher()
    with _open_regular(path, max_bytes) as (f, size):
        while size > 0 and (chunk := f.read(min(size, 1 << 20))):
            h.update(chunk)
            size -= len(chunk)
    return h.hexdigest()


@contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise DecodeTimeout in the block once `seconds` have passed (SIGALRM).

    The decode runs in a DataLoader worker process or, with no workers, in the caller:
    either way in the main thread of its process, where an alarm can interrupt it (Python
    runs the handler between bytecodes, and Pillow decodes in small chunks). Elsewhere
    (another thread, or an alarm already set by someone else) the block runs unbounded.
    """
    usable = (
        seconds is not None
        and seconds > 0
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )
    if not usable:
        yield
        return

    def give_up(signum, frame):
        raise DecodeTimeout(f"gave up: decoding took over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, give_up)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def decode_image(path, draft_size: int | None = None):
    """(RGB image, (width, height) as displayed) of a file name or binary file object.
    Raises on anything that is not a sound image.

    JPEGs are decoded in draft mode at no less than `draft_size`: the decoder skips the
    DCT scales the model's resize would throw away anyway, several times faster. A file
    name is read through `read_file` (regular files only, bounded), so a FIFO given as
    `--image` fails at once instead of blocking.
    """
    from PIL import Image, ImageOps

    if isinstance(path, (str, os.PathLike)):
        path = io.BytesIO(read_file(os.fspath(path)))

    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its pixel limit; a bomb is a bomb.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.seek(0)  # first frame of a GIF or multi-page TIFF
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB"), (width, height)


@dataclass(frozen=True)
class Reading:
    """How each file is read and decoded, with the bounds that keep one hostile file from
    stalling a run or filling memory."""

    timeout: float | None = DECODE_TIMEOUT_S  # seconds to read, decode and preprocess one
    max_bytes: int = MAX_FILE_BYTES
    decode: Callable = decode_image  # (file object, draft size) -> (RGB image, size)


def describe_error(e: BaseException) -> str:
    """One short reason for the failure list.

    >>> describe_error(OSError("image file is truncated (3 bytes not processed)"))
    'image file is truncated (3 bytes not processed)'
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, BadFile):
        return str(e)
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "decompression bomb: over Pillow's pixel limit"
    if isinstance(e, UnidentifiedImageError):
        return "not an image (unidentified format)"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, OSError) and getattr(e, "strerror", None):
        return e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class _ImageFiles:
    """A torch Dataset of paths; each item is (position, pixels or None, size, error, hash).

    The file is read once, for both its content hash and decoding: hashing here runs in
    the parallel workers instead of a serial pass before them. Reading, decoding and
    preprocessing one file together get `timeout` seconds.
    """

    def __init__(self, paths: list[str], preprocess, draft_size: int, reading: Reading):
        self.paths, self.preprocess, self.draft_size = paths, preprocess, draft_size
        self.reading = reading

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            with deadline(self.reading.timeout):
                data = read_file(self.paths[i], self.reading.max_bytes)
                if not data:
                    return i, None, (0, 0), "empty file (0 bytes)", None
                h = _hasher()
                h.update(data)
                img, size = self.reading.decode(io.BytesIO(data), self.draft_size)
                pixels = self.preprocess(img)
            return i, pixels, size, None, h.hexdigest()
        except Exception as e:  # any decoder error is a per-file failure, never a crash
            return i, None, (0, 0), describe_error(e), None


@dataclass
class DecodedBatch:
    positions: list[int]  # into the path list, for images that decoded
    pixels: torch.Tensor | None
    sizes: list[tuple[int, int]]
    hashes: list[str]  # content_hash of each decoded file
    failures: list[tuple[int, str]]  # (position, reason)


def _collate(items) -> DecodedBatch:
    import torch

    ok = [it for it in items if it[1] is not None]
    return DecodedBatch(
        positions=[it[0] for it in ok],
        pixels=torch.stack([it[1] for it in ok]) if ok else None,
        sizes=[it[2] for it in ok],
        hashes=[it[4] for it in ok],
        failures=[(it[0], it[3]) for it in items if it[1] is None],
    )


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))


def decoded_batches(
    paths: list[str],
    preprocess,
    image_size: int,
    batch_size: int = 64,
    workers: int | None = None,
    pin_memory: bool = False,
    reading: Reading = Reading(),
) -> Iterator[DecodedBatch]:
    """Batches decoded by `workers` processes while the caller runs the model."""
    from torch.utils.data import DataLoader

    workers = default_workers() if workers is None else workers
    loader = DataLoader(
        _ImageFiles(paths, preprocess, image_size, reading),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    with warnings.catch_warnings():
        # Workers are forked here, between two LanceDB calls, and only decode images:
        # they never touch the LanceDB runtime its fork hook warns about.
        warnings.filterwarnings("ignore", "lancedb fork support", RuntimeWarning)
        # pylance's, once the Ray engine has imported it in this process: the same case.
        warnings.filterwarnings("ignore", "lance is not fork-safe", UserWarning)
        batches = iter(loader)
    yield from batches


class CpuThreadPicker:
    """Chooses torch's intra-op thread count for one run by timing its first batch.

    On CPU the model shares the cores with the decode workers (and whatever else runs).
    When they are busy, intra-op threads wait for one another at every op: on 2 busy
    cores a tiny model ran 20x slower with 2 threads than with 1, and ViT-B-32 2x slower;
    on idle cores, more threads are faster. So the first batch is split in four slices run
    with the default count, 1 thread, the default, 1 thread; the faster per image is kept
    (best slice of each: the first one also pays one-off allocations).
    """

    def __init__(self):
        import torch

        self.default = torch.get_num_threads()
        self.chosen: int | None = None if self.default > 1 else self.default

    def run(self, fn, pixels):
        import torch

        if self.chosen is not None or len(pixels) < 4:
            return fn(pixels)
        outs, best = [], {}
        for threads, part in zip([self.default, 1] * 2, torch.tensor_split(pixels, 4), strict=True):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            outs.append(fn(part))
            per_image = (time.perf_counter() - t0) / len(part)
            best[threads] = min(best.get(threads, per_image), per_image)
        self.chosen = min(best, key=best.get)
        torch.set_num_threads(self.chosen)
        return torch.cat(outs)

    def restore(self) -> None:
        import torch

        torch.set_num_threads(self.default)


def embed_batches(
    clip: ClipModel,
    paths: list[str],
    batch_size: int = 64,
    workers: int | None = None,
    reading: Reading = Reading(),
) -> Iterator[tuple[DecodedBatch, torch.Tensor | None]]:
    """(batch, embeddings of its decoded images) for every batch, in path order."""
    threads = CpuThreadPicker() if clip.device == "cpu" else None
    try:
        for batch in decoded_batches(
            paths,
            clip.preprocess,
            clip.image_size,
            batch_size,
            workers,
            pin_memory=clip.device.startswith("cuda"),
            reading=reading,
        ):
            if batch.pixels is None:
                vectors = None
            elif threads is not None:
                vectors = threads.run(clip.encode_images, batch.pixels)
            else:
                vectors = clip.encode_images(batch.pixels)
            yield batch, vectors
    finally:
        if threads is not None:
            threads.restore()
