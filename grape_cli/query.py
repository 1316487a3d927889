"""A query is a value: its text, an optional reference image, and the weight of that image.

The same `Query` flows through pairs files, `grape search`, `grape eval`, the reward and
`grape train`, and `blend` is the one place where a query becomes the vector the index is
searched with: the (rewritten) text's embedding, plus the reference image's embedding
times `image_weight` when there is one, renormalised. An image alone is searched by its
own embedding. A vision-language rewriter has read the reference image, so its caption
already describes the wanted image and is searched alone (`sees_images`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from grape_cli.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

DEFAULT_IMAGE_WEIGHT = 1.0


@dataclass(frozen=True)
class Query:
    """What a user asks for. `image` is an absolute path (a reference image, which need not
    be in the index); `image_weight` scales its embedding against the text's."""

    text: str = ""
    image: str | None = None
    image_weight: float = DEFAULT_IMAGE_WEIGHT

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise TypeError(f"Query.text must be a string, not {type(self.text).__name__}")
        object.__setattr__(self, "text", self.text.strip())
        if self.image_weight < 0:
            raise UsageError(
                f"image_weight {self.image_weight} is negative", "use 0 or more (1 by default)"
            )

    @property
    def composed(self) -> bool:
        """A reference image plus text (the third query shift)."""
        return bool(self.text) and self.image is not None

    @property
    def empty(self) -> bool:
        return not self.text and self.image is None

    def with_text(self, text: str) -> Query:
        return replace(self, text=text)

    def to_dict(self) -> dict:
        out: dict = {"query": self.text}
        if self.image is not None:
            out["image"] = self.image
            if self.image_weight != DEFAULT_IMAGE_WEIGHT:
                out["image_weight"] = self.image_weight
        return out


def as_query(q: Query | str | None) -> Query:
    """A `Query` from a Query or plain text (the common case in scripts)."""
    if isinstance(q, Query):
        return q
    return Query(text=q or "")


def blend(text_vecs: np.ndarray | None, image_vec: np.ndarray | None, weight: float):
    """Text vectors (n, d) plus weight x the image vector (1, d), each row renormalised.

    >>> import numpy as np
    >>> [round(float(x), 3) for x in blend(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), 1.0)[0]]
    [0.707, 0.707]
    >>> blend(None, np.array([[0.0, 1.0]]), 1.0).tolist()
    [[0.0, 1.0]]
    """
    import numpy as np

    if image_vec is None:
        return text_vecs
    if text_vecs is None or len(text_vecs) == 0:
        return np.asarray(image_vec, dtype=np.float32).reshape(1, -1)
    out = text_vecs + weight * np.asarray(image_vec).reshape(1, -1)
    return (out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def embed_rewrites(
    clip, queries: Sequence[Query], texts: Sequence[Sequence[str]], sees_images: bool = False
) -> list:
    """`query_vectors` for many queries at once: every text encoded in one batch, each
    reference image once. Returns one (n_i, d) array per query.

    `sees_images`: the texts come from a rewriter that read the reference images (a
    vision-language model), so each already describes the wanted image and is searched
    alone; otherwise the reference image's embedding is blended in."""
    from itertools import pairwise

    import numpy as np

    flat = [t for group in texts for t in group]
    vecs = clip.encode_texts(flat).numpy() if flat else np.zeros((0, 0), dtype=np.float32)
    bounds = np.cumsum([0, *(len(g) for g in texts)])
    images: dict[str, np.ndarray] = {}
    out = []
    for q, (a, b) in zip(map(as_query, queries), pairwise(bounds), strict=True):
        image_vec = None
        if q.image is not None and not (sees_images and b > a):
            if q.image not in images:
                images[q.image] = encode_image_file(clip, q.image)
            image_vec = images[q.image]
        out.append(blend(vecs[a:b] if b > a else None, image_vec, q.image_weight))
    return out


def check_image_path(path, what: str = "image") -> None:
    """An InputError that names the real cause when `path` is not a readable image file
    (checked before any model is loaded)."""
    import os

    from grape_cli.errors import InputError

    if os.path.isdir(path):
        raise InputError(f"cannot read {what} {path}: it is a folder", "pass an image file")
    if not os.path.exists(path):
        raise InputError(f"cannot read {what} {path}: no such file", "check the path")
    if not os.path.isfile(path):
        raise InputError(
            f"cannot read {what} {path}: not a regular file (a device, pipe or socket)",
            "pass an image file",
        )


def read_image(path: str, draft_size: int | None = None, max_side: int | None = None):
    """The RGB image of a file, no side longer than `max_side`; an InputError naming the
    file if it is not a readable image."""
    from grape_cli.embed import decode_image, describe_error
    from grape_cli.errors import InputError

    check_image_path(path)
    try:
        img, _ = decode_image(str(path), draft_size=draft_size or max_side)
    except Exception as e:
        raise InputError(
            f"cannot read image {path}: {describe_error(e)}", "pass a JPEG, PNG or WebP"
        ) from None
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    return img


def encode_image_file(clip, path: str):
    """The embedding (1, d) of an image file; an InputError naming the file if unreadable."""
    pixels = clip.preprocess(read_image(path, draft_size=clip.image_size)).unsqueeze(0)
    return clip.encode_images(pixels).numpy()
