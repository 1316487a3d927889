"""The `--html` page of `grape search`: one self-contained file to judge results by eye.

Thumbnails are embedded as base64 JPEGs, so the page can be mailed or archived and still
show what was found; each links to the original file.
"""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from grape_cli.search import SearchResult

THUMB_PX = 256

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }
h1 { font-size: 1.3rem; margin: 0 0 .4rem; }
.meta { color: #555; font-size: .9rem; margin: .2rem 0; }
.rewrites { margin: .6rem 0 1.2rem; padding-left: 1.2rem; }
.rewrites li { font-size: 1rem; margin: .15rem 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 1rem; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5rem; }
figure img { width: 100%; height: 200px; object-fit: contain; background: #eee; display: block; }
.missing { height: 200px; display: flex; align-items: center; justify-content: center;
  background: #f3e5e5; color: #933; font-size: .85rem; text-align: center; padding: .5rem; }
figcaption { font-size: .8rem; margin-top: .4rem; word-break: break-all; }
.score { font-weight: 600; }
"""


def thumbnail_data_uri(path: str, px: int = THUMB_PX) -> str:
    """The image at `path` as a `data:image/jpeg;base64,...` thumbnail (longest side px)."""
    from grape_cli.embed import decode_image

    img, _ = decode_image(path, draft_size=px)
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(result: SearchResult, thumb_px: int = THUMB_PX) -> str:
    """A complete HTML document showing the query, its rewrite(s) and the ranked images."""
    from grape_cli.embed import describe_error

    title = result.query or (Path(result.image).name if result.image else "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>grape search: {escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{escape(result.query) if result.query else '(image query)'}</h1>",
    ]
    if result.rewrites and result.rewriter != "none":
        parts.append(f'<p class="meta">rewritten by {escape(result.rewriter)} into:</p>')
        parts.append('<ol class="rewrites">')
        parts += [f"<li>{escape(r)}</li>" for r in result.rewrites]
        parts.append("</ol>")
    if result.image:
        weight = "" if result.image_weight is None else f" (weight {result.image_weight:g})"
        parts.append(f'<p class="meta">image query: {escape(result.image)}{weight}</p>')
    parts.append(
        f'<p class="meta">{len(result.hits)} results · score: {escape(result.score_kind)} · '
        f"model {escape(result.model)} · index {escape(result.index)}</p>"
    )
    parts.append('<div class="grid">')
    for hit in result.hits:
        try:
            picture = (
                f'<img src="{thumbnail_data_uri(hit.path, thumb_px)}" '
                f'alt="result {hit.rank}: {escape(Path(hit.path).name)}">'
            )
        except Exception as e:  # a file moved or broken since indexing: say so, in place
            picture = f'<div class="missing">cannot show: {escape(describe_error(e))}</div>'
        parts.append(
            f"<figure>{picture}<figcaption>"
            f'<span class="score">#{hit.rank} · {hit.score:.4f}</span><br>'
            f'<a href="{escape(Path(hit.path).as_uri())}" title="{escape(hit.path)}">'
            f"{escape(hit.path)}</a></figcaption></figure>"
        )
    parts.append("</div></body></html>")
    return "\n".join(parts) + "\n"


def write_html(result: SearchResult, path: str | Path, thumb_px: int = THUMB_PX) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(result, thumb_px), encoding="utf-8")
    return path
