"""Choosing which of the proxy's HTTP layers serves a test's requests."""

from __future__ import annotations

import pytest

from trio_dht.proxy import asgi, frontend


def serve_with_quart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request of the proxies started from now on is served by hypercorn and the Quart app (the route
    table's routes as Quart views): neither the front end nor the raw-ASGI path finds a route."""
    monkeypatch.setattr(frontend, "match", lambda *args, **kwargs: None)
    monkeypatch.setattr(asgi, "match", lambda *args, **kwargs: None)


def serve_with_asgi(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request of the proxies started from now on is handed to hypercorn, whose raw-ASGI path serves the
    route table's routes (as for TLS and handed-over connections)."""
    monkeypatch.setattr(frontend, "match", lambda *args, **kwargs: None)
