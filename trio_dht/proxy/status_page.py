"""``GET /status``: the live status page, one HTML file with its script and style inline (``status.html``
beside this module; nothing else is loaded).

The page reads the proxy's own JSON every 2 seconds (``node/info``, ``node/stats``, ``healthz``, relative to
its own path, so it works behind a reverse proxy that mounts the proxy under a prefix), keeps the last
5 minutes of readings, computes rates from successive counter readings and draws its charts on canvases.
A failed read shows a banner and is retried; nothing is thrown to the console.

The reply is made once, on the first request: the file, with the names of the limit counters of
``/node/stats`` filled in as a JSON data block (:data:`~trio_dht.limits_hit.LIMIT_COUNTERS`, the counters of
the program's "limits reached" log line), and a ``Content-Security-Policy`` that lets the page run only its
own inline script and style, each allowed by its SHA-256 computed here from the file (so an edit of the page
cannot leave a stale hash), and fetch only from where it came from. ``'unsafe-inline'`` would let any
script that found its way into the page run; hashes let only these.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from importlib import resources

from trio_dht.limits_hit import LIMIT_COUNTERS
from trio_dht.proxy.replies import Reply

PAGE = "status.html"
LIMITS_BLOCK = '<script type="application/json" id="limit-counters">[]</script>'
"""The data block of the page that gets :data:`~trio_dht.limits_hit.LIMIT_COUNTERS` (not run: no CSP hash)."""
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)
"""The page's inline scripts and styles (a ``<script>`` with attributes, the data block, is not run)."""


def csp(html: str) -> str:
    """The ``Content-Security-Policy`` of ``html``: only its own inline ``<script>`` and ``<style>`` (by
    hash) run, fetches go to the origin it came from, images only as ``data:`` (the empty favicon), nothing
    else loads, no form posts, no framing by other pages."""
    sources: dict[str, list[str]] = {"script": [], "style": []}
    for tag, text in _INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        sources[tag].append(f"'sha256-{digest}'")
    script, style = (" ".join(sources[tag]) or "'none'" for tag in ("script", "style"))
    return "; ".join(
        (
            "default-src 'none'",
            f"script-src {script}",
            f"style-src {style}",
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


@functools.cache
def reply() -> Reply:
    """``GET /status``'s reply: the page (read from the package once) and its headers."""
    html = resources.files(__package__).joinpath(PAGE).read_text(encoding="utf-8")
    if LIMITS_BLOCK not in html:
        raise RuntimeError(f"{PAGE} has no limit-counters data block")
    html = html.replace(LIMITS_BLOCK, LIMITS_BLOCK.replace("[]", json.dumps(list(LIMIT_COUNTERS))))
    headers = (
        ("Content-Type", "text/html; charset=utf-8"),
        ("Content-Security-Policy", csp(html)),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", "no-cache"),
    )
    return Reply(200, html.encode(), headers)
