"""The running process: one DHT node and its front ends, composed as one Trio nursery tree.

This is the one place where the tree is put together. :func:`run` reads top to bottom; the tasks below
``serve_proxy`` are started by the proxy's own modules (named on the right)::

    run(config)                         returns after SIGINT/SIGTERM; raises when any task fails
    └── nursery
        ├── _cancel_on_signal           the first SIGINT or SIGTERM cancels the whole tree
        ├── SystemdNotifier.run         with $NOTIFY_SOCKET (sd_notify.py): watchdog pings from the event
        │                               loop; STOPPING=1 when cancelled (READY=1 is sent once all serve)
        ├── _keep_node_state            with -f: the node's id, good nodes and values saved
        ├── _watch_peers                logs peers found and lost per family; systemd's STATUS=
        ├── _report_limits              one line a minute naming the limits reached (limits_hit.py)
        └── open_node(...)              the UDP node (node/dht.py), whose nursery runs:
            ├── UdpEndpoint.serve       per socket: a batch of datagrams per wake-up, answered at once
            ├── _request_timer          resends and timeouts of every request we await (one timer)
            ├── _expiry_loop, _maintenance_loop, _confirm_loop, _bootstrap_loop (with -b)
            ├── ListenDriver.run        our listens kept open on their storing nodes (+ _setups)
            ├── get rounds              Searches: one round per key shared by concurrent gets
            └── _open_push(...)         (the block's body) the push side: HTTP client and this nursery:
                ├── Dispatcher.run      push delivery: batching, retries, one lane per gateway
                ├── PushService.run     subscriptions: deadlines, DHT listens, pushes
                └── services nursery    what serves the node to the outside; stops first
                    ├── Prompt.run      with --interactive: dhtnode's prompt (interactive/shell.py), its
                    │                   line reads in a worker thread, its gets and puts in its nursery;
                    │                   x, q or end of input stop the whole tree as SIGTERM does
                    └── serve_proxy     the REST proxy: --proxyserver PORT (default 8000), --proxyserverssl
                        ├── ProxyState.run              permanent puts: expiry, refresh pushes, restore
                        └── FrontEnd.serve              (shielded; on cancellation drained, then cut)
                            └── ASGI lifespan nursery   hypercorn's Lifespan.handle_lifespan
                                └── connections         drained on shutdown:
                                    ├── a task per connection (FrontEnd._serve_connection; hypercorn's
                                    │   TCPServer inside it for TLS and handed-over connections)
                                    ├── WorkerLink.run per HTTP worker (--http-workers)
                                    │   ├── trio.run_process    the worker process (below)
                                    │   └── _write_blocked, _expect_ready   the channel's writer, start-up
                                    ├── WorkerLink._answer_later    a relayed SUBSCRIBE awaiting values
                                    └── acceptors               cancelled on shutdown:
                                        ├── accept_loop per listening socket (TLS; plain without workers)
                                        ├── close_late_connections  the sweep of connection deadlines
                                        └── Poller.run          reads idle connections (Linux epoll)

    HTTP worker process: http_worker.main -> trio.run(HttpWorker.run)
    └── nursery: close_late_connections (its sweep), _resume_accepts (after an accept pause); the one
        serving task reads every socket through one epoll

A task that fails cancels the others, and its exception leaves :func:`run` (inside ExceptionGroups); the CLI
turns that into one line and exit code 1.

What an operator needs is logged at INFO: the start (node id, UDP ports, proxy URLs, push apps), peers found
and lost per address family, push gateway lanes failing and delivering again (``push/dispatcher.py``), and
the limits reached (once a minute).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from trio_dht.cli import AppConfig, format_host_port
from trio_dht.config_file import (
    ApnsCredentials,
    AppSpec,
    FcmCredentials,
    GorushCredentials,
    WebPushCredentials,
    route,
)
from trio_dht.infohash import InfoHash
from trio_dht.limits_hit import REPORT_EVERY, LimitsHit
from trio_dht.node import DhtNode, open_node
from trio_dht.node.connectivity import Connectivity, family_name
from trio_dht.node.ratelimit import UdpRateLimiter
from trio_dht.node.saved_state import NodeState, bootstrap_addresses, capture, restore_values
from trio_dht.persist import PersistError, StateStore
from trio_dht.proxy.push_hooks import CountingGateway, ProxyPushHooks, PushCounts
from trio_dht.proxy.put_journal import StorePutJournal
from trio_dht.proxy.server import serve_proxy
from trio_dht.push.apps import AppGateways
from trio_dht.push.dispatcher import DeliveryQueue, Dispatcher
from trio_dht.push.gateway import new_http_client
from trio_dht.push.gorush import GorushGateway
from trio_dht.push.payloads import Platform
from trio_dht.push.service import PushService
from trio_dht.push.unifiedpush import UnifiedPushGateway
from trio_dht.sd_notify import SystemdNotifier
from trio_dht.wire import msgpack_codec

if TYPE_CHECKING:
    from trio_dht.crypto import Identity

log = logging.getLogger(__name__)

SAVE_NODE_STATE_EVERY = 300.0
"""Seconds between saves of the node's id and good nodes with ``-f``."""
WATCH_PEERS_EVERY = 5.0
"""Seconds between two looks at whether each family has good peers."""


async def run(config: AppConfig, *, task_status: trio.TaskStatus[DhtNode] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the node and its front ends until SIGINT or SIGTERM; ``task_status`` gets the node once serving."""
    identity = _identity(config)
    notifier = SystemdNotifier.from_environ()
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(StateStore(config.persist_path)) if config.persist_path else None
        saved = store.load_node_state() if store is not None else None
        bootstrap = [*config.bootstrap, *(bootstrap_addresses(saved) if saved is not None else ())]
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
                if notifier is not None:
                    await nursery.start(notifier.run)
                async with open_node(
                    port=config.port,
                    host=config.bind,
                    host6=config.bind6,
                    bootstrap=bootstrap,
                    network=config.network,
                    node_id=InfoHash(saved.node_id) if saved is not None and identity is None else None,
                    identity=identity,
                    rate_limiter=None if config.rate_limit else UdpRateLimiter(per_ip=-1, total=-1),
                    limits=config.limits,
                ) as node:
                    _log_node(node, config)
                    if store is not None:
                        await nursery.start(_keep_node_state, node, store, saved)
                    stats = _StatsDocument(node)
                    async with _open_push(node, config, store) as push, trio.open_nursery() as services:
                        if config.proxy is not None:
                            push = {**push, "on_stats": stats.use}
                        urls = await _start_proxy(services, node, config, push) or []
                        peers = Connectivity()
                        nursery.start_soon(_watch_peers, node, peers, notifier, urls)
                        nursery.start_soon(_report_limits, stats)
                        log.info("running; SIGINT or SIGTERM stops")
                        if notifier is not None:
                            notifier.ready(_status(peers, urls))
                        if config.interactive:
                            await services.start(_prompt(node, nursery.cancel_scope).run)
                        task_status.started(node)
                        await trio.sleep_forever()
    log.info("stopped")


async def _app_gateway(
    app: AppSpec, client: Any, limits: Any, stack: contextlib.AsyncExitStack
) -> Any | None:
    """The gateway of a push app (its connections closed with ``stack``); None for a ``webpush`` app (its
    VAPID key signs the UnifiedPush gateway's requests)."""
    credentials = app.credentials
    if isinstance(credentials, GorushCredentials):
        return GorushGateway(client, credentials.url, bundle_id=credentials.bundle_id, limits=limits)
    if isinstance(credentials, FcmCredentials):
        from trio_dht.push.fcm import FCM_URL, FcmGateway, new_fcm_client

        url = credentials.url or FCM_URL
        fcm_client = await stack.enter_async_context(new_fcm_client(limits, url))
        return await stack.enter_async_context(
            FcmGateway(
                fcm_client, credentials.account, fcm_url=url, token_uri=credentials.token_uri, limits=limits
            )
        )
    if isinstance(credentials, ApnsCredentials):
        from trio_dht.push.apns import ApnsGateway, ApnsKey

        key = ApnsKey(credentials.private_key, credentials.key_id, credentials.team_id)
        bundle_id = app.topics[0] if app.topics else ""
        ca_file = str(credentials.ca_file) if credentials.ca_file is not None else None
        return await stack.enter_async_context(
            ApnsGateway(
                key,
                bundle_id=bundle_id,
                sandbox=credentials.sandbox,
                url=credentials.url,
                ca_file=ca_file,
                limits=limits,
            )
        )
    return None


def _describe(app: AppSpec) -> str:
    """Where an app's pushes go, for the log."""
    credentials = app.credentials
    if isinstance(credentials, GorushCredentials):
        return f"gorush at {credentials.url}"
    if isinstance(credentials, FcmCredentials):
        return f"FCM project {credentials.account.project_id} (app {app.id})"
    if isinstance(credentials, ApnsCredentials):
        host = credentials.url or ("APNs sandbox" if credentials.sandbox else "APNs")
        return f"{host} with key {credentials.key_id} of team {credentials.team_id} (app {app.id})"
    return f"app {app.id}"


def _identity(config: AppConfig) -> Identity | None:
    """The identity the flags ask for (loaded, or new with -i), saved with --save-identity; None without."""
    if not (config.identity or config.certificate):
        return None
    try:
        from trio_dht.crypto import Identity
    except ImportError as exc:  # the zipapp without its native packages (TRIO_DHT_NATIVE=0, another Python)
        raise RuntimeError(f"an identity needs the cryptography package ({exc})") from None
    if config.certificate is not None and config.private_key is not None:
        identity = Identity.load(config.private_key, config.certificate, config.private_key_password)
    else:
        identity = Identity.generate()
    if config.save_identity is not None:
        path = config.save_identity
        identity.save(path.with_name(path.name + ".pem"), path.with_name(path.name + ".crt"))
        log.info("identity saved to %s.pem and %s.crt", path, path)
    log.info("identity: public key id %s", identity.id.hex())
    return identity


async def _keep_node_state(
    node: DhtNode,
    store: StateStore,
    saved: NodeState | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Restore the values the node stored before a restart, then save the node's id and good nodes every
    :data:`SAVE_NODE_STATE_EVERY` seconds, and them and the values it stores for others when the tree stops
    (``node.saved_state``). Values are saved only then: saving them takes about 3 µs each, up to a second at
    the storage quota, which a running node must not block on; they are soft state that their owners put
    again, so a killed node loses only what it stored since its last stop."""
    if saved is not None:
        values = saved.values or ()
        restored = restore_values(node.protocol.store, values, trio.current_time(), time.time())
        log.info(
            "came back as %s: %d saved nodes to rejoin through, %d of %d saved values still alive",
            node.node_id.hex(), len(saved.nodes), restored, len(values),
        )  # fmt: skip
    task_status.started()
    try:
        while True:
            await trio.sleep(SAVE_NODE_STATE_EVERY)
            _save_node_state(node, store, with_values=False)
    finally:
        _save_node_state(node, store, with_values=True)


def _save_node_state(node: DhtNode, store: StateStore, *, with_values: bool) -> None:
    storage = node.storage if with_values else None
    state = capture(node.node_id, node.tables, storage, trio.current_time(), time.time())
    with contextlib.suppress(PersistError):  # counted and logged by the store; the next save tries again
        store.save_node_state(state)


class _StatsDocument:
    """Builds the ``/node/stats`` document for the limits report: the proxy's once it serves, else the node's
    counters alone."""

    def __init__(self, node: DhtNode) -> None:
        self.build: Callable[[float], dict[str, Any]] = lambda now: {"nodeInfo": node.info().extra}

    def use(self, build: Callable[[float], dict[str, Any]]) -> None:
        self.build = build


async def _report_limits(stats: _StatsDocument) -> None:
    """Every :data:`~trio_dht.limits_hit.REPORT_EVERY` seconds, one line naming the limits reached since."""
    report = LimitsHit()
    elapsed = 0.0
    while True:
        try:  # a report is not worth the process: a failure here is logged, as /node/stats answers 500
            line = report.line(stats.build(trio.current_time()), elapsed)
        except Exception:
            log.exception("the limits report failed")
        else:
            if line is not None:
                log.info("%s", line)
        await trio.sleep(REPORT_EVERY)
        elapsed = REPORT_EVERY


async def _watch_peers(
    node: DhtNode, peers: Connectivity, notifier: SystemdNotifier | None, urls: list[str]
) -> None:
    """Every :data:`WATCH_PEERS_EVERY` seconds: log each family that found its first good peer or lost its
    last one, and tell systemd the new status."""
    while True:
        await trio.sleep(WATCH_PEERS_EVERY)
        now = trio.current_time()
        tables = node.tables
        changes = peers.update({v6: tables[v6].is_connected(now) for v6 in node.protocol.families}, now)
        for v6, connected in changes:
            good, dubious = tables[v6].counts(now)
            if connected:
                log.info("%s: peers found (%d good nodes)", family_name(v6), good)
            else:
                log.warning("%s: peers lost (no good node, %d dubious)", family_name(v6), dubious)
        if changes and notifier is not None:
            notifier.status(_status(peers, urls))


def _status(peers: Connectivity, urls: list[str]) -> str:
    """The service's status for systemd: the node's peers and where the proxy serves."""
    return f"{peers.describe()}; {'proxy on ' + ', '.join(urls) if urls else 'no proxy'}"


def _prompt(node: DhtNode, scope: trio.CancelScope) -> Any:
    """dhtnode's prompt over ``node``; quitting it cancels ``scope`` (the whole tree)."""
    from trio_dht.interactive import Prompt

    def stop() -> None:
        log.info("quit at the prompt, shutting down")
        scope.cancel()

    return Prompt(node, stop)


async def _cancel_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    """Wait for the first SIGINT or SIGTERM, then cancel ``scope``."""
    async for signum in signals:
        log.info("got %s, shutting down", signal.Signals(signum).name)
        scope.cancel()
        return


def _log_node(node: DhtNode, config: AppConfig) -> None:
    sockets = ", ".join(
        f"{'IPv6' if v6 else 'IPv4'} {format_host_port(*addr)}" for v6, addr in node.bound.items()
    )
    log.info(
        "node %s on UDP port %d (%s), network %d, msgpack %s",
        node.node_id.hex(),
        node.bound_port,
        sockets,
        config.network,
        "pure Python" if msgpack_codec.PURE else "C extension",
    )
    bootstrap = ", ".join(format_host_port(host, port) for host, port in config.bootstrap)
    log.info("bootstrap: %s", bootstrap or "none (waiting to be contacted)")


@asynccontextmanager
async def _open_push(
    node: DhtNode, config: AppConfig, store: StateStore | None
) -> AsyncIterator[dict[str, Any]]:
    """The proxy's push side: gateways, dispatcher and subscriptions; yields serve_proxy's push arguments.

    UnifiedPush needs no server of ours (the endpoint is in the device token; a ``webpush`` app, the default
    of ``unifiedpush``, signs its requests with VAPID). Android and iOS pushes go through the app their
    platform and topic pick (``trio_dht.push.apps``): gorush (``--pushserver``), FCM or APNs; with none they
    are dropped and counted, as OpenDHT does.
    """
    if config.proxy is None:
        if config.push_server is not None:
            log.warning("--pushserver ignored: push notifications are served by the proxy, which is off")
        yield {}
        return
    limits = config.limits
    async with (
        new_http_client(limits) as client,
        contextlib.AsyncExitStack() as push_stack,
        trio.open_nursery() as push_tasks,
    ):
        counts = PushCounts()  # /node/stats: pushes per platform and priority
        webpush = route(config.apps, Platform.UNIFIEDPUSH.value, "")
        vapid = None
        if webpush is not None and isinstance(webpush.credentials, WebPushCredentials):
            from trio_dht.push.vapid import Vapid

            credentials = webpush.credentials
            vapid = Vapid(credentials.private_key, credentials.vapid_subject)
            log.info("UnifiedPush requests signed with VAPID key %s", vapid.public_key)
        unifiedpush = CountingGateway(
            UnifiedPushGateway(
                client, allow_private=config.allow_private_endpoints, limits=limits, vapid=vapid
            ),
            counts,
        )
        by_app: dict[str, Any] = {}
        for app in config.apps:
            gateway = await _app_gateway(app, client, limits, push_stack)
            if gateway is not None:
                by_app[app.id] = CountingGateway(gateway, counts, name=app.id)
                topics = f" for {', '.join(app.topics)}" if app.topics else ""
                log.info("%s pushes%s through %s", " and ".join(app.platforms), topics, _describe(app))
        if not by_app:
            log.info("no push app for Android or iOS: their pushes are dropped (UnifiedPush is served)")
        router = AppGateways(config.apps, by_app, unifiedpush)
        # No batch window: an idle lane sends a push at once; under load, batches still form from what queues
        # while the lane's request is in flight, so a window would only add its length to every push's delay.
        dispatcher = Dispatcher(router, queue=DeliveryQueue(batch_window=0.0, limits=limits), limits=limits)
        await push_tasks.start(dispatcher.run)
        service = PushService(
            node,
            dispatcher,
            lifetime=config.subscription_lifetime,
            store=store,
            allow_private_endpoints=config.allow_private_endpoints,
            limits=config.limits,
        )
        await push_tasks.start(service.run)
        yield {
            "push": ProxyPushHooks(service, dispatcher, counts),
            "journal": StorePutJournal(store) if store is not None else None,
        }
        push_tasks.cancel_scope.cancel()


async def _start_proxy(
    services: trio.Nursery, node: DhtNode, config: AppConfig, push: dict[str, Any]
) -> list[str]:
    """Start the REST proxy (plain HTTP and/or HTTPS, as configured) in front of ``node``, if it is on; the
    URLs it serves."""
    if config.proxy is None:
        return []
    urls: list[str] = await services.start(functools.partial(serve_proxy, **push), node, config.proxy)
    for url in urls:
        log.info("proxy on %s", url)
    return urls
