"""Decode images in parallel workers and embed them, overlapping decode with the model."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from grape_cli.models import ClipModel

_EXIF_ORIENTATION = 0x0112


def content_hash(path: str) -> str:
    """blake2b of the file's bytes: finds moved and copied files without decoding them."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def decode_image(path: str, draft_size: int | None = None):
    """(RGB image, (width, height) as displayed). Raises on anything that is not a sound image.

    JPEGs are decoded in draft mode at no less than `draft_size`: the decoder skips the
    DCT scales the model's resize would throw away anyway, several times faster.
    """
    from PIL import Image, ImageOps

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


def describe_error(e: BaseException) -> str:
    """One short reason for the failure list.

    >>> describe_error(OSError("image file is truncated (3 bytes not processed)"))
    'image file is truncated (3 bytes not processed)'
    """
    from PIL import Image, UnidentifiedImageError

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
    """A torch Dataset of paths; each item is (position, pixels or None, size, error)."""

    def __init__(self, paths: list[str], preprocess, draft_size: int):
        self.paths, self.preprocess, self.draft_size = paths, preprocess, draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            if os.path.getsize(self.paths[i]) == 0:
                return i, None, (0, 0), "empty file (0 bytes)"
            img, size = decode_image(self.paths[i], self.draft_size)
            return i, self.preprocess(img), size, None
        except Exception as e:  # any decoder error is a per-file failure, never a crash
            return i, None, (0, 0), describe_error(e)


@dataclass
class DecodedBatch:
    positions: list[int]  # into the path list, for images that decoded
    pixels: torch.Tensor | None
    sizes: list[tuple[int, int]]
    failures: list[tuple[int, str]]  # (position, reason)


def _collate(items) -> DecodedBatch:
    import torch

    ok = [it for it in items if it[1] is not None]
    return DecodedBatch(
        positions=[it[0] for it in ok],
        pixels=torch.stack([it[1] for it in ok]) if ok else None,
        sizes=[it[2] for it in ok],
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
) -> Iterator[DecodedBatch]:
    """Batches decoded by `workers` processes while the caller runs the model."""
    from torch.utils.data import DataLoader

    workers = default_workers() if workers is None else workers
    loader = DataLoader(
        _ImageFiles(paths, preprocess, image_size),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    yield from loader


def embed_batches(
    clip: ClipModel, paths: list[str], batch_size: int = 64, workers: int | None = None
) -> Iterator[tuple[DecodedBatch, torch.Tensor | None]]:
    """(batch, embeddings of its decoded images) for every batch, in path order."""
    for batch in decoded_batches(
        paths,
        clip.preprocess,
        clip.image_size,
        batch_size,
        workers,
        pin_memory=clip.device.startswith("cuda"),
    ):
        vectors = clip.encode_images(batch.pixels) if batch.pixels is not None else None
        yield batch, vectors
