"""Writing figures: PNG/SVG for matplotlib, standalone offline HTML for plotly, index pages.

Interactive pages embed plotly.js itself (inlined once per page, gzip-compressed and
inflated by the browser), so they open without a network; :func:`external_urls`
lists any script, style sheet or image a page would fetch from the web (there must be none).
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from sfp.core.io import image_tag, save_png
from sfp.viz.figures.style import figure_style

__all__ = [
    "IndexEntry",
    "external_urls",
    "save_figure",
    "write_html_page",
    "write_plotly_page",
]

#: Plotly config of every interactive figure: no logo link, PNG download at 2x.
PLOTLY_CONFIG: dict[str, Any] = {
    "displaylogo": False,
    "responsive": True,
    "toImageButtonOptions": {"format": "png", "scale": 2},
}

# A resource the browser would fetch: <script src=...>, <link href=...>, <img src=...>,
# <iframe src=...>, CSS @import / url(...), pointing at http(s) or protocol-relative URLs.
_EXTERNAL = re.compile(
    r"""<(?:script|img|iframe|source|embed)\b[^>]*?\bsrc\s*=\s*["']?((?:https?:)?//[^"'\s>]+)"""
    r"""|<link\b[^>]*?\bhref\s*=\s*["']?((?:https?:)?//[^"'\s>]+)"""
    r"""|@import\s+(?:url\()?["']?((?:https?:)?//[^"')\s]+)"""
    r"""|url\(\s*["']?((?:https?:)?//[^"')\s]+)""",
    re.IGNORECASE,
)


def external_urls(page: str) -> list[str]:
    """URLs of scripts, style sheets, images or frames that ``page`` (HTML text) would load
    from the network. Links a reader may click (``<a href>``) are not counted; plotly.js's
    inlined source is skipped (its strings hold attribution links, not resources)."""
    stripped = re.sub(r"<script\b[^>]*>.*?</script>", "<script></script>", page,
                      flags=re.IGNORECASE | re.DOTALL)
    # Re-check <script src=...> tags themselves, which the substitution keeps as open tags.
    found = []
    for text in (stripped, "".join(re.findall(r"<script\b[^>]*>", page, re.IGNORECASE))):
        for m in _EXTERNAL.finditer(text):
            url = next(g for g in m.groups() if g)
            if url not in found:
                found.append(url)
    return found


def save_figure(
    fig: Figure,
    stem: str | Path,
    formats: Sequence[str] = ("png", "svg"),
    dpi: int = 150,
    source: Any = None,
) -> list[Path]:
    """Save ``fig`` as ``stem.png``, ``stem.svg``, ... (folders created); returns the paths.

    PNGs are written at ``dpi`` through :func:`sfp.core.io.save_png`: they carry the model's
    text chunks and, for random or synthetic weights, a banner above the figure. source: the
    bundle or trace the figure shows (None: unknown). SVGs keep text as text (editable,
    searchable; the fonts are named, DejaVu Sans first) and name the model and its caveat in
    their description. The figure is not closed (it is not registered with pyplot, so it is
    freed when no longer referenced).
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        fmt = fmt.lower().lstrip(".")
        if fmt not in ("png", "svg", "pdf"):
            raise ValueError(f"unsupported figure format {fmt!r}; use png, svg or pdf")
        path = stem.with_suffix(f".{fmt}")
        with figure_style():  # rcParams read at save time (svg.fonttype: text stays text)
            if fmt == "png":
                buf = io.BytesIO()
                fig.savefig(buf, dpi=dpi, format="png")
                buf.seek(0)
                with Image.open(buf) as im:
                    save_png(im.convert("RGBA"), path, source)
            else:
                tag = image_tag(source)
                desc = "; ".join(f"{k}: {v}" for k, v in tag.items() if k != "Software")
                meta = {"Description": desc} if desc and fmt == "svg" else None
                fig.savefig(path, format=fmt, metadata=meta)
        paths.append(path)
    return paths


_CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif;
       max-width: 1250px; margin: 1.5em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.08em; margin-bottom: .3em; }
.banner { padding: .7em 1em; border-radius: 6px; margin: 1em 0; }
.banner.synthetic { background: #fff3cd; border: 1px solid #e0b000; }
.banner.real { background: #e7f5ea; border: 1px solid #6cb47a; }
.figure { margin: 1em 0 2em 0; }
.figure img { max-width: 100%; border: 1px solid #eee; }
.what { background: #f6f8fa; border-left: 4px solid #8aa; padding: .5em .8em; margin: .4em 0; }
.files { font-size: .9em; color: #555; }
.sfp-plot { overflow-x: auto; }
.sfp-plot.pending { background: #fafafa; border: 1px dashed #ddd; }
table { border-collapse: collapse; font-size: .92em; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f0f0f0; }
pre { background: #f6f8fa; padding: .6em; overflow-x: auto; font-size: .88em; }
"""


@dataclass
class IndexEntry:
    """One section of an HTML page: a heading, optional explanation, image and file links.

    image: path of a PNG relative to the page (shown inline); links: (text, relative path);
    html_body: extra raw HTML (already escaped) placed after the text.
    """

    title: str
    text: str = ""
    image: str | None = None
    links: list[tuple[str, str]] = field(default_factory=list)
    html_body: str = ""
    level: int = 3


def _entry_html(e: IndexEntry) -> str:
    h = f"h{e.level}"
    parts = [f'<div class="figure"><{h}>{html.escape(e.title)}</{h}>']
    if e.text:
        parts.append(f'<div class="what">{html.escape(e.text)}</div>')
    if e.html_body:
        parts.append(e.html_body)
    if e.image:
        src = html.escape(e.image, quote=True)
        parts.append(f'<a href="{src}"><img src="{src}" alt="{html.escape(e.title)}"></a>')
    if e.links:
        links = " · ".join(
            f'<a href="{html.escape(p, quote=True)}">{html.escape(t)}</a>' for t, p in e.links
        )
        parts.append(f'<div class="files">{links}</div>')
    parts.append("</div>")
    return "\n".join(parts)


def _heading(title: str, banner: str, synthetic: bool) -> list[str]:
    """The page title and, when given, the banner (a warning colour for synthetic models)."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if banner:
        cls = "synthetic" if synthetic else "real"
        parts.append(f'<div class="banner {cls}">{html.escape(banner)}</div>')
    return parts


def _write_page(path: str | Path, title: str, body: Sequence[str], head_extra: str = "") -> Path:
    """Write a complete HTML document with the shared style sheet; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>\n{head_extra}</head>\n"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


def write_html_page(
    path: str | Path,
    title: str,
    entries: Sequence[IndexEntry],
    *,
    banner: str = "",
    synthetic: bool = False,
    intro_html: str = "",
) -> Path:
    """Write a self-contained HTML page (no external resources) of ``entries``.

    banner: a highlighted sentence at the top (e.g. which weights were used); ``synthetic``
    colours it as a warning. intro_html: raw HTML placed after the banner.
    """
    body = _heading(title, banner, synthetic)
    if intro_html:
        body.append(intro_html)
    body.extend(_entry_html(e) for e in entries)
    return _write_page(path, title, body)


def _gzip_b64(text: str) -> str:
    """``text`` UTF-8 encoded, gzip-compressed (deterministic: no timestamp), base64."""
    return base64.b64encode(gzip.compress(text.encode("utf-8"), compresslevel=9,
                                          mtime=0)).decode("ascii")


@functools.lru_cache(maxsize=1)
def _plotlyjs_gz() -> str:
    """plotly.js, gzip-compressed and base64-encoded (about a third of its 4.7 MB)."""
    from plotly.offline import get_plotlyjs

    return _gzip_b64(get_plotlyjs())


def _compact(obj: Any, images: dict[str, int]) -> Any:
    """A figure's JSON tree with each embedded image (``data:image/...`` string) replaced by
    ``"@img:<k>"`` (k indexes ``images``, filled here: one copy per distinct image) and
    float64 binary arrays stored as float32 (plotly's ``{"dtype", "bdata"}`` encoding)."""
    if isinstance(obj, dict):
        if obj.get("dtype") == "f8" and isinstance(obj.get("bdata"), str):
            arr = np.frombuffer(base64.b64decode(obj["bdata"]), dtype="<f8")
            return dict(obj, dtype="f4",
                        bdata=base64.b64encode(arr.astype("<f4").tobytes()).decode("ascii"))
        return {k: _compact(v, images) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_compact(v, images) for v in obj]
    if isinstance(obj, str) and obj.startswith("data:image/"):
        return f"@img:{images.setdefault(obj, len(images))}"
    return obj


# Inflates plotly.js and the figures (gzip + base64, DecompressionStream), puts the images
# back, and draws each figure when it first comes near the viewport (a fast first paint
# however many figures the page holds).
_LOADER = """
(async () => {
  const inflate = async (b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return await new Response(stream).text();
  };
  const read = (id) => document.getElementById(id).textContent.trim();
  const lib = document.createElement("script");
  lib.textContent = await inflate(read("sfp-plotlyjs"));
  document.head.appendChild(lib);
  const page = JSON.parse(await inflate(read("sfp-figures")));
  const restore = (o) => {
    if (typeof o === "string" && o.startsWith("@img:")) return page.images[+o.slice(5)];
    if (Array.isArray(o)) return o.map(restore);
    if (o && typeof o === "object") {
      for (const k of Object.keys(o)) o[k] = restore(o[k]);
    }
    return o;
  };
  const draw = (div) => {
    const fig = restore(page.figures[+div.dataset.fig]);
    div.classList.remove("pending");
    Plotly.newPlot(div, fig.data, fig.layout || {}, page.config);
  };
  const divs = Array.from(document.querySelectorAll("div.sfp-plot"));
  if ("IntersectionObserver" in window) {
    const seen = new IntersectionObserver((entries) => {
      for (const e of entries) {
        if (e.isIntersecting) { seen.unobserve(e.target); draw(e.target); }
      }
    }, { rootMargin: "600px" });
    divs.forEach((d) => seen.observe(d));
  } else {
    divs.forEach(draw);
  }
})();
"""


def write_plotly_page(
    path: str | Path,
    figures: Sequence[tuple[str, Any]],
    *,
    title: str,
    banner: str = "",
    synthetic: bool = False,
    notes: Sequence[str] | None = None,
) -> Path:
    """One standalone HTML page holding several plotly figures, with plotly.js inlined once.

    figures: (heading, plotly Figure) pairs; notes: optional text under each heading. Works
    offline: the page loads nothing from the network. To stay a few MB, plotly.js and the
    figures are stored gzip-compressed (the browser inflates them), each distinct embedded
    image once and float arrays as float32; figures are drawn as they come into view.
    """
    parts = _heading(title, banner, synthetic)
    images: dict[str, int] = {}
    specs = []
    for i, (heading, fig) in enumerate(figures):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if notes is not None and i < len(notes) and notes[i]:
            parts.append(f'<div class="what">{html.escape(notes[i])}</div>')
        spec = _compact(json.loads(fig.to_json()), images)
        specs.append(spec)
        lay = spec.get("layout", {})
        size = f"height:{int(lay.get('height') or 450)}px;"
        if lay.get("width"):
            size += f"width:{int(lay['width'])}px;"
        parts.append(f'<div class="sfp-plot pending" id="fig{i}" data-fig="{i}" '
                     f'style="{size}"></div>')
    payload = json.dumps({"figures": specs, "images": list(images), "config": PLOTLY_CONFIG},
                         separators=(",", ":"))
    parts.append('<script type="application/gzip+base64" id="sfp-plotlyjs">'
                 f"{_plotlyjs_gz()}</script>")
    parts.append('<script type="application/gzip+base64" id="sfp-figures">'
                 f"{_gzip_b64(payload)}</script>")
    parts.append(f'<script type="text/javascript">{_LOADER}</script>')
    return _write_page(path, title, parts)
