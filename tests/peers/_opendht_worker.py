"""Child process hosting one PyPI ``opendht`` node, driven by JSON lines (run as a script).

The C++ ``DhtRunner`` has its own threads and calls back from them, so it lives here, away
from Trio. Protocol, one JSON object per line:

* stdin, commands: ``{"id": n, "cmd": name, ...arguments}``.
* stdout, replies: ``{"id": n, "ok": true, "result": ...}`` or ``{"id": n, "ok": false, "error": text}``.
* stdout, events: ``{"event": "ready", "version": v}`` once at start, and for each listen
  ``{"event": "value", "listen": lid, "expired": bool, "value": {...}}``.

A value is ``{"id": int, "data": base64, "type": int | null, "utype": str, "owner": hex key id | null}``.
The 4.4.2 binding does not expose a value's type, so ``type`` is only known (and set) when a get
filtered on it with ``"type"``; otherwise it is null.

Commands: ``start {port, host, network, rate_limit, log, node_id}`` -> ``{"port", "node_id"}``;
``bootstrap {host, port}``; ``put {key, data, type, utype, value_id, permanent}`` -> ``{"ok", "id"}``;
``get {key, type, value_id}`` -> ``{"ok", "values"}``; ``listen {key, listen}`` (no filter:
the binding's listen takes none);
``cancel_listen {listen}``; ``node_id``; ``routing`` -> per family ``{"good", "dubious",
"expired"}``; ``storage_log``; ``shutdown`` (replies, then the process exits). EOF on stdin
also shuts down.

Binding facts (opendht 4.4.2, from its .pyx and by running it):

* ``DhtRunner.run(id=None, is_bootstrap=False, port=0, ipv4="", ipv6="", config=DhtConfig())``.
  With ``ipv4="127.0.0.1"`` and no ``ipv6`` it binds only 127.0.0.1 (no IPv6 socket);
  ``getBound(AF_INET)`` gives the real port when ``port=0``.
* ``Value(data, type_id)``: the second argument is the value *type*; ``.id`` is settable.
  A put with id 0 gets a random id, readable from the same ``Value`` once the put is done.
* ``listen(key, cb(value, expired) -> bool)`` returns a ``ListenToken``. Its callback object is
  kept in a dict shared by *all* tokens (``ListenToken._cb``), and ``cancelListen`` releases
  whatever that dict holds last: with several listens it releases the wrong one. We keep our own
  reference to each callback object and put it back in the shared dict before cancelling.
* About 4 s after ``cancelListen`` the callback may fire once more with ``expired=True`` (as observed
  with opendht 4.4.2): events of a cancelled listen are dropped here.
* ``getRoutingTablesLog(af)`` prints ``    Node <id> <addr> updated: ...`` lines ending in
  ``[good]``, ``[expired]`` or nothing (dubious). ``getNodeMessageStats()`` gives message
  counters (ping/find/get/listen/put), not node counts.
* ``enableLogging()`` writes to fd 1; fd 1 is pointed at stderr before anything starts, and the
  protocol uses a private copy of the original stdout.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

# Keep the protocol channel private: C++ logging and stray prints go to stderr.
_protocol = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

import opendht  # noqa: E402  (after the redirection on purpose)

_lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
_broken = False
"""The parent stopped reading (a write failed): lines are dropped from then on."""


def _write_lines() -> None:
    global _broken
    try:
        while (line := _lines.get()) is not None:
            _protocol.write(line + "\n")
            _protocol.flush()
    except OSError:
        _broken = True


_writer = threading.Thread(target=_write_lines, name="protocol writer", daemon=True)
_writer.start()


def emit(message: dict[str, Any]) -> None:
    """Queue one protocol line (from any thread); the writer thread writes it. A callback on the DHT thread
    so never waits on I/O, during which the GIL is free (see :func:`dht_callback`)."""
    if not _broken:
        _lines.put(json.dumps(message, separators=(",", ":")))


def close_protocol() -> None:
    """Write the queued lines, then stop the writer; if it is stuck in a write (the parent no longer reads),
    end the process at once (a daemon thread inside a write would abort the interpreter's exit)."""
    _lines.put(None)
    _writer.join(5.0)
    if _writer.is_alive():
        os._exit(1)


# The binding deadlocks if it is called carelessly: the DHT thread runs its loop holding the runner's mutex
# and calls Python callbacks from there, taking the GIL; the runner's queries (getStorageLog,
# getRoutingTablesLog, getNodeMessageStats) and join() take that mutex while holding the GIL. A query made
# while a callback waits for the GIL never returns. So callbacks never release the GIL on purpose (no I/O:
# emit queues), and a query first waits until no callback runs and no get or put is under way (quiet_dht).
# That narrows the window to a callback starting on its own (a listen's) within a query; it cannot close it.
# Both records change with single list and set calls, atomic under the GIL (a lock could make a callback
# wait, GIL released, before it is counted).
_callbacks_running: list[None] = []
"""One entry per callback under way on the DHT thread."""
_ops_under_way: set[int] = set()
"""The gets and puts whose done callback has not run yet."""
_op_ids = itertools.count()


def dht_callback(function: Callable[..., Any], ends_op: int | None = None) -> Callable[..., Any]:
    """``function`` as a callback for the binding, counted while it runs; as the done callback of operation
    ``ends_op`` (see :func:`operation`), it also ends that operation."""

    @functools.wraps(function)
    def counted(*args: Any) -> Any:
        _callbacks_running.append(None)
        try:
            return function(*args)
        finally:
            if ends_op is not None:
                _ops_under_way.discard(ends_op)
            _callbacks_running.pop()

    return counted


def operation(done: Callable[..., Any]) -> Callable[..., Any]:
    """``done`` as the done callback of a get or put about to be handed to the binding: the operation is
    under way until it has run."""
    op = next(_op_ids)
    _ops_under_way.add(op)
    return dht_callback(done, ends_op=op)


def quiet_dht(timeout: float = 5.0) -> None:
    """Wait (GIL released) until no callback runs and no get or put is under way, twice 20 ms apart (the DHT
    thread leaves the binding's wrapper of the last callback meanwhile), so that a query that follows does
    not deadlock (see above); at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _callbacks_running or _ops_under_way:
            time.sleep(0.001)
            continue
        time.sleep(0.02)
        if not _callbacks_running and not _ops_under_way:
            return


def owner_id(value: opendht.Value) -> str | None:
    """The hex key id of a signed value's owner (the node checked its signature before handing it over)."""
    try:
        return str(value.owner.getId())
    except ValueError:  # "PublicKey is not initialized": an unsigned value
        return None


def encode_value(value: opendht.Value, value_type: int | None) -> dict[str, Any]:
    recipient = str(value.recipient)
    return {
        "id": value.id,
        "data": base64.b64encode(value.data).decode(),
        "type": value_type,
        "utype": value.user_type,
        "owner": owner_id(value),
        # A value's "to": the key id it was encrypted for (the node hands it over decrypted), else None.
        "recipient": None if recipient == "0" * 40 else recipient,
    }


def routing_counts(log: str) -> dict[str, int]:
    counts = {"good": 0, "dubious": 0, "expired": 0}
    for line in log.splitlines():
        if not line.lstrip().startswith("Node "):
            continue
        if line.endswith("[good]"):
            counts["good"] += 1
        elif line.endswith("[expired]"):
            counts["expired"] += 1
        else:
            counts["dubious"] += 1
    return counts


class Worker:
    """One DhtRunner and the commands that drive it."""

    def __init__(self) -> None:
        self.dht = opendht.DhtRunner()
        self.running = False
        # listen id -> (key, token, the binding's callback object, kept alive here)
        self.listens: dict[int, tuple[opendht.InfoHash, Any, Any]] = {}
        self.cancelled: set[int] = set()
        self.kept_callbacks: list[Any] = []

    @staticmethod
    def where(args: dict[str, Any]) -> opendht.Where | None:
        where = None
        if args.get("type") is not None:
            where = opendht.Where().valueType(int(args["type"]))
        if args.get("value_id") is not None:
            where = (where or opendht.Where()).id(int(args["value_id"]))
        return where

    @staticmethod
    def key(args: dict[str, Any]) -> opendht.InfoHash:
        text = str(args["key"])
        if len(text) != 40 or any(c not in "0123456789abcdefABCDEF" for c in text):
            raise ValueError(f"key must be 40 hex digits, got {text!r}")
        return opendht.InfoHash(text.lower().encode())

    def do_start(self, request_id: int, args: dict[str, Any]) -> None:
        if self.running:
            raise RuntimeError("already started")
        config = opendht.DhtConfig()
        config.setNetwork(int(args.get("network", 0)))
        config.setPeerDiscovery(False, False)  # multicast discovery would leave loopback
        if args.get("node_id"):
            config.setNodeId(opendht.InfoHash(str(args["node_id"]).encode()))
        if not args.get("rate_limit", True):
            config.setRateLimit(-1, -1)
        identity = None
        if args.get("identity_bits"):
            identity = opendht.Identity.generate(
                str(args.get("identity_name", "opendht")), bits=int(args["identity_bits"])
            )
            config.setIdentity(identity)
        log = args.get("log")
        host = str(args.get("host", "127.0.0.1"))
        if ":" in host:
            self.dht.run(port=int(args.get("port", 0)), ipv6=host, config=config)
            family = socket.AF_INET6
        else:
            self.dht.run(port=int(args.get("port", 0)), ipv4=host, config=config)
            family = socket.AF_INET
        self.running = True
        if log is True:
            self.dht.enableLogging()
        elif isinstance(log, str):
            self.dht.enableFileLogging(log)
        bound = self.dht.getBound(family)
        result: dict[str, Any] = {"port": bound.getPort(), "node_id": self.node_id()}
        if identity is not None:
            result["certificate"] = identity.certificate.toString()
        emit({"id": request_id, "ok": True, "result": result})

    def node_id(self) -> str:
        return str(self.dht.getNodeId())

    def do_bootstrap(self, request_id: int, args: dict[str, Any]) -> None:
        self.dht.bootstrap(str(args["host"]), str(args["port"]))
        emit({"id": request_id, "ok": True, "result": None})

    def do_put(self, request_id: int, args: dict[str, Any]) -> None:
        value = opendht.Value(base64.b64decode(args["data"]), int(args.get("type") or 0))
        if args.get("utype"):
            value.user_type = str(args["utype"])
        if args.get("value_id") is not None:
            value.id = int(args["value_id"])

        def done(ok: bool, _nodes: Any) -> None:
            emit({"id": request_id, "ok": True, "result": {"ok": bool(ok), "id": value.id}})

        permanent = bool(args.get("permanent", False))
        self.dht.put(self.key(args), value, done_cb=operation(done), permanent=permanent)

    def do_put_signed(self, request_id: int, args: dict[str, Any]) -> None:
        value = opendht.Value(base64.b64decode(args["data"]), int(args.get("type") or 0))
        if args.get("value_id") is not None:
            value.id = int(args["value_id"])

        def done(ok: bool, _nodes: Any) -> None:
            emit({"id": request_id, "ok": True, "result": {"ok": bool(ok), "id": value.id}})

        self.dht.putSigned(self.key(args), value, done_cb=operation(done))

    def do_put_encrypted(self, request_id: int, args: dict[str, Any]) -> None:
        value = opendht.Value(base64.b64decode(args["data"]), int(args.get("type") or 0))
        if args.get("value_id") is not None:
            value.id = int(args["value_id"])

        def done(ok: bool, _nodes: Any) -> None:
            emit({"id": request_id, "ok": True, "result": {"ok": bool(ok), "id": value.id}})

        # 4.x takes the recipient's long key id (PkId) and finds its certificate on the DHT.
        to = opendht.PkId(str(args["to"]).encode())
        self.dht.putEncrypted(self.key(args), value, to, done_cb=operation(done))

    def do_get(self, request_id: int, args: dict[str, Any]) -> None:
        values: list[dict[str, Any]] = []
        value_type = args.get("type")

        @dht_callback
        def on_value(value: opendht.Value) -> bool:
            values.append(encode_value(value, value_type))
            return True

        def done(ok: bool, _nodes: Any) -> None:
            emit({"id": request_id, "ok": True, "result": {"ok": bool(ok), "values": values}})

        self.dht.get(self.key(args), get_cb=on_value, done_cb=operation(done), where=self.where(args))

    def do_listen(self, request_id: int, args: dict[str, Any]) -> None:
        listen_id = int(args["listen"])

        @dht_callback
        def on_value(value: opendht.Value, expired: bool) -> bool:
            if listen_id in self.cancelled:
                return False
            emit(
                {
                    "event": "value",
                    "listen": listen_id,
                    "expired": bool(expired),
                    "value": encode_value(value, None),
                }
            )
            return True

        key = self.key(args)
        token = self.dht.listen(key, on_value)
        callback_object = opendht.ListenToken._cb.get("cb")
        self.kept_callbacks.append(callback_object)
        self.listens[listen_id] = (key, token, callback_object)
        emit({"id": request_id, "ok": True, "result": None})

    def do_cancel_listen(self, request_id: int, args: dict[str, Any]) -> None:
        listen_id = int(args["listen"])
        entry = self.listens.pop(listen_id, None)
        if entry is not None:
            self.cancelled.add(listen_id)
            _key, token, callback_object = entry
            opendht.ListenToken._cb["cb"] = callback_object  # so cancelListen releases this one
            self.dht.cancelListen(token)
        emit({"id": request_id, "ok": True, "result": entry is not None})

    def do_node_id(self, request_id: int, args: dict[str, Any]) -> None:
        emit({"id": request_id, "ok": True, "result": self.node_id()})

    def do_routing(self, request_id: int, args: dict[str, Any]) -> None:
        quiet_dht()
        result = {
            "ipv4": routing_counts(self.dht.getRoutingTablesLog(socket.AF_INET)),
            "ipv6": routing_counts(self.dht.getRoutingTablesLog(socket.AF_INET6)),
            "message_stats": list(self.dht.getNodeMessageStats()),
        }
        emit({"id": request_id, "ok": True, "result": result})

    def do_storage_log(self, request_id: int, args: dict[str, Any]) -> None:
        quiet_dht()
        emit({"id": request_id, "ok": True, "result": self.dht.getStorageLog()})

    def shutdown(self) -> None:
        if not self.running:
            return
        self.running = False
        done = threading.Event()
        self.dht.shutdown(dht_callback(done.set))
        done.wait(5.0)
        quiet_dht()
        self.dht.join()


def main() -> None:
    worker = Worker()
    emit({"event": "ready", "version": opendht.version()})
    for line in sys.stdin:
        if not line.strip():
            continue
        request_id = None
        try:
            request = json.loads(line)
            request_id = request.get("id")
            command = request["cmd"]
            if command == "shutdown":
                worker.shutdown()
                emit({"id": request_id, "ok": True, "result": None})
                return
            handler = getattr(worker, f"do_{command}", None)
            if handler is None:
                raise ValueError(f"unknown command {command!r}")
            if command != "start" and not worker.running:
                raise RuntimeError(f"{command}: node not started")
            handler(request_id, request)
        except Exception as exc:
            emit({"id": request_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    worker.shutdown()


if __name__ == "__main__":
    try:
        main()
    finally:
        close_protocol()
