"""A self-contained HTML results page: each query sketch beside its ranked results, as thumbnails.

Every image is embedded as a small JPEG thumbnail in a base64 ``data:`` URI, so the page is one file
that opens anywhere (no links to the photos, which may live on another machine)::

    from zsbir_infer.report import QueryResult, write_html
    write_html("results.html", [QueryResult("cat.png", "cat.png", hits)], title="zsbir results")

``hits`` are :class:`zsbir_infer.retriever.Hit` objects or anything with ``path`` and ``score`` (and
optionally ``relpath`` and ``relevant``: ``True``/``False`` draws a green/red frame, as the demo does with
the benchmark's labels). A photo that cannot be read any more is shown as a grey placeholder.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zsbir_infer.fsio import atomic_write

__all__ = ["THUMB_QUALITY", "THUMB_SIZE", "QueryResult", "render_html", "thumbnail_data_uri", "write_html"]

#: Longest side of a thumbnail, in pixels.
THUMB_SIZE = 160
#: JPEG quality of thumbnails.
THUMB_QUALITY = 75


@dataclass
class QueryResult:
    """One query of the page: its label, its image (path, bytes or PIL image; ``None`` for an embedding)
    and its hits, best first."""

    label: str
    image: Any
    hits: Sequence[Any] = field(default_factory=list)


def thumbnail_data_uri(image: Any, size: int = THUMB_SIZE, quality: int = THUMB_QUALITY) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail (longest side ``size``), or ``None`` if unreadable."""
    from PIL import Image

    from zsbir_infer.preprocess import to_pil

    try:
        img = to_pil(image, target_size=(size, size))
        img.thumbnail((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality, optimize=True)
    except Exception:  # unreadable or vanished file: the page shows a placeholder
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em} p.meta{color:#666;margin:0 0 1.2em;font-size:.9em}
section.q{display:flex;gap:1.2em;align-items:flex-start;background:#fff;border:1px solid #ddd;border-radius:8px;
padding:.8em;margin-bottom:1em}
figure{margin:0;text-align:center;font-size:.75em;width:%(w)dpx;overflow-wrap:anywhere}
figure.sketch{border-right:2px solid #eee;padding-right:1em}
figure img,figure div.missing{width:%(w)dpx;height:%(w)dpx;object-fit:contain;background:#f0f0f0;border-radius:4px;
border:3px solid transparent;box-sizing:border-box}
figure.ok img{border-color:#2e9d4a} figure.bad img{border-color:#d0433a}
div.results{display:flex;flex-wrap:wrap;gap:.6em}
figcaption .score{font-weight:600} figcaption .rank{color:#888}
"""


def _display(path: str) -> str:
    """A file name for the page: bytes that are not UTF-8 (surrogate escapes) shown as ``\\xNN``."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _figure(img_uri: str | None, caption: str, cls: str = "") -> str:
    pic = (
        f'<img src="{img_uri}" alt="{html.escape(caption, quote=True)}">'
        if img_uri
        else '<div class="missing" title="cannot read this image"></div>'
    )
    cls_attr = f' class="{cls}"' if cls else ""
    return f"<figure{cls_attr}>{pic}<figcaption>{caption}</figcaption></figure>"


def render_html(
    results: Sequence[QueryResult], *, title: str = "zsbir results", subtitle: str = "", thumb_size: int = THUMB_SIZE
) -> str:
    """The page as a string (see the module docstring)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS % {'w': thumb_size}}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = f"{html.escape(subtitle)} &middot; {when}" if subtitle else when
    parts.append(f'<p class="meta">{meta}</p>')
    for res in results:
        parts.append('<section class="q">')
        uri = thumbnail_data_uri(res.image, thumb_size) if res.image is not None else None
        parts.append(_figure(uri, f"<b>query</b><br>{html.escape(res.label)}", "sketch"))
        parts.append('<div class="results">')
        if not res.hits:
            parts.append("<p>no results</p>")
        for rank, hit in enumerate(res.hits, start=1):
            path = str(getattr(hit, "path", ""))
            shown = _display(str(getattr(hit, "relpath", None) or path))
            score = float(getattr(hit, "score", float("nan")))
            relevant = getattr(hit, "relevant", None)
            cls = "ok" if relevant is True else "bad" if relevant is False else ""
            caption = (
                f'<span class="rank">#{int(getattr(hit, "rank", rank))}</span> '
                f'<span class="score">{score:.3f}</span><br>{html.escape(shown)}'
            )
            rel = getattr(hit, "relpath", None)
            escapes = isinstance(rel, str) and (rel.startswith("/") or ".." in rel.split("/"))
            # A hit whose path leaves its photo folder is never opened (the retriever refuses those already).
            parts.append(_figure(None if escapes else thumbnail_data_uri(path, thumb_size), caption, cls))
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html(
    out: str | os.PathLike[str],
    results: Sequence[QueryResult],
    *,
    title: str = "zsbir results",
    subtitle: str = "",
    thumb_size: int = THUMB_SIZE,
) -> Path:
    """Write the page to ``out`` atomically (temporary file + rename); returns the path."""
    path = Path(out)
    text = render_html(results, title=title, subtitle=subtitle, thumb_size=thumb_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, text)
