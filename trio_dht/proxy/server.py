"""Serving the proxy (:func:`serve_proxy`): the plain sockets through the front end
(:mod:`~trio_dht.proxy.frontend`, which hands other requests to hypercorn), TLS sockets through hypercorn,
and a clean drain on cancellation.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from quart import Blueprint

from trio_dht.api import Dht
from trio_dht.proxy.asgi import create_app
from trio_dht.proxy.frontend import FrontEnd
from trio_dht.proxy.permanent import PutJournal
from trio_dht.proxy.settings import ProxyConfig
from trio_dht.proxy.state import PushHooks


class _HypercornConfig(Config):
    """hypercorn's config with OpenDHT's socket and TLS settings.

    A ``[::]`` bind is dual-stack where the OS makes IPv6 sockets so by default (Linux: ``bindv6only=0``).
    """

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sockets

    def create_ssl_context(self) -> ssl.SSLContext | None:
        context = super().create_ssl_context()
        if context is not None:
            context.minimum_version = ssl.TLSVersion.TLSv1_3  # OpenDHT's proxy is TLS 1.3 only
        return context


def hypercorn_config(config: ProxyConfig) -> Config:
    plain, tls = config.binds()
    cfg = _HypercornConfig()
    if tls:
        cfg.bind = tls
        cfg.insecure_bind = plain
        cfg.certfile = config.certificate
        cfg.keyfile = config.private_key
        cfg.keyfile_password = config.private_key_password
    else:
        cfg.bind = plain
    cfg.backlog = config.backlog
    cfg.graceful_timeout = config.graceful_timeout
    cfg.include_server_header = False  # the proxy sends its own
    limits = config.limits
    # hypercorn's deadlines: its keep-alive wait runs from a connection's start (or its last response) to the
    # end of the next request's head, so it bounds the head; a request body is bounded by Quart's
    # BODY_TIMEOUT and the raw-ASGI path's own deadline, a send by the front end's stream (read_timeout stays
    # off: it would cut a listen stream whose client has nothing to say).
    cfg.keep_alive_timeout = min(cfg.keep_alive_timeout, limits.http_head_timeout)
    cfg.ssl_handshake_timeout = limits.http_head_timeout
    # HTTP/1.1 only by ALPN (OpenDHT's clients speak it): an HTTP/2 client that never opens its flow-control
    # window would leave a response in hypercorn with no deadline.
    cfg.alpn_protocols = ["http/1.1"]
    cfg.accesslog = None
    return cfg


async def serve_proxy(
    dht: Dht,
    config: ProxyConfig,
    *,
    blueprints: Iterable[Blueprint] = (),
    push: PushHooks | None = None,
    journal: PutJournal | None = None,
    on_stats: Callable[[Callable[[float], dict[str, Any]]], None] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the REST proxy for ``dht`` until cancelled; ``task_status.started`` gets the bound URLs, and
    ``on_stats`` (if given) the function that builds ``/node/stats`` from the time ``now``.

    On cancellation: open listen streams are ended (each gets its last chunk), no new connection is accepted,
    and requests in flight get ``config.graceful_timeout`` seconds to finish before connections are cut.
    """
    app = create_app(dht, config, blueprints=blueprints, push=push, journal=journal)
    if on_stats is not None:
        on_stats(app.state.stats)
    cfg = hypercorn_config(config)
    sockets = cfg.create_sockets()
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        sock.listen(cfg.backlog)
    front = FrontEnd(app, cfg, http_workers=config.http_workers)
    async with trio.open_nursery() as nursery:
        server_scope = trio.CancelScope(shield=True)

        async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
            with server_scope:
                await front.serve(
                    sockets.insecure_sockets,
                    sockets.secure_sockets,
                    cfg.create_ssl_context(),
                    task_status=task_status,
                )

        urls: list[str] = await nursery.start(run_server)
        nursery.start_soon(app.state.run)
        task_status.started(urls)
        try:
            await trio.sleep_forever()
        finally:
            app.state.close_listens()
            front.shutdown()
            server_scope.deadline = trio.current_time() + config.graceful_timeout + 1.0
