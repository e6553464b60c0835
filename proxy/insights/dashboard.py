"""`GET /dashboard`: the operator's live page, shipped inside the package and served as one self-contained document.

The page holds no data and needs no key to load. It asks for an admin key (kept in the tab's sessionStorage) and
polls the JSON APIs with it, so everything it shows passes the same checks as any other client, and it draws its
charts itself (inline SVG): no CDN, no chart library, works offline.

Page, style and script are three files in `dashboard/`, readable on their own; they are joined into one HTML answer
once, on the first request: one round trip, and the lean engine (exact paths only) needs one route.

Why a strict Content-Security-Policy: the page handles an admin key. Only its own script and style run (allowed
by their hashes, computed here), it talks to this origin only, and no other site may frame it.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
from importlib import resources

from aiohttp import web

_ASSETS = resources.files("proxy.insights") / "dashboard"
# index.html names its style and script as files (so it also opens from disk); these tags are what gets inlined.
_STYLE_TAG = '<link rel="stylesheet" href="dashboard.css" />'
_SCRIPT_TAG = '<script src="dashboard.js"></script>'


class Page:
    """The joined document, plain and gzipped, and its headers."""

    __slots__ = ("gzip_headers", "gzipped", "headers", "html")

    def __init__(self, html: str, css: str, js: str) -> None:
        if _STYLE_TAG not in html or _SCRIPT_TAG not in html:
            raise ValueError("dashboard/index.html must link dashboard.css and dashboard.js with the expected tags")
        if "</style" in css.lower() or "</script" in js.lower():
            raise ValueError("an inlined asset would close its own tag early")
        doc = html.replace(_STYLE_TAG, f"<style>{css}</style>").replace(_SCRIPT_TAG, f"<script>{js}</script>")
        self.html = doc.encode()
        self.gzipped = gzip.compress(self.html, 9, mtime=0)  # ~3× smaller; built once, so level 9 costs nothing
        csp = (
            "default-src 'none'",
            f"script-src {_digest(js)}",
            f"style-src {_digest(css)}",
            "connect-src 'self'",  # the JSON APIs and /metrics of this gateway
            "img-src data:",  # the empty favicon: no request for /favicon.ico
            "base-uri 'none'",
            "form-action 'none'",  # the key form is handled by the script, never submitted
            "frame-ancestors 'none'",
        )
        self.headers = {
            "Content-Type": "text/html; charset=utf-8",
            "Content-Security-Policy": "; ".join(csp),
            "Cache-Control": "no-cache",  # revalidate: a new release must not meet a stale script
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "Vary": "Accept-Encoding",
        }
        self.gzip_headers = {**self.headers, "Content-Encoding": "gzip"}


def _digest(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


@functools.cache
def page() -> Page:
    html, css, js = (
        (_ASSETS / name).read_text(encoding="utf-8") for name in ("index.html", "dashboard.css", "dashboard.js")
    )
    return Page(html, css, js)


async def dashboard(request: web.Request) -> web.Response:
    """The page; no key (it holds no data). Gzipped for clients that accept it."""
    p = page()
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        return web.Response(body=p.gzipped, headers=p.gzip_headers)
    return web.Response(body=p.html, headers=p.headers)
