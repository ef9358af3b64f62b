"""A real OpenDHT node (PyPI ``opendht`` 4.4.2) on loopback, driven from Trio.

The C++ node runs in a child process (``_opendht_worker.py``, same interpreter) that speaks
JSON lines; see that module for the protocol and the binding's quirks. Usage::

    async with open_opendht_peer(bootstrap=("127.0.0.1", port)) as peer:
        await peer.wait_for_nodes()
        assert await peer.put(key, b"data")
        values = await peer.get(key)            # [{"id", "data": bytes, "type", "utype"}]
        async with peer.listen(key) as events:  # {"id", "data", "type", "utype", "expired"}
            async for event in events: ...

Facts learned by running it (opendht 4.4.2, this sandbox):

* The node binds 127.0.0.1 only (``run(ipv4="127.0.0.1")`` opens no IPv6 socket); port 0
  gives a kernel-chosen port, reported back, so there is no port race.
* ``host="::1"`` binds IPv6 loopback only. ``node_id=`` fixes the node id.
* The worker is up in 0.05-0.1 s (import + ``run``); shutdown (``shutdown`` + ``join``) takes
  about 10 ms. A bootstrapped node sees its peer as good within about 0.1 s.
* A put or get on a node with no peers completes at once with ``ok=False``, but the value is
  stored locally and a local get returns it (a local listen did not fire). Bootstrapped to one
  loopback peer, a put succeeds in a few ms once that peer has answered (``wait_for_nodes``).
* A listen on one opendht node saw another opendht node's put about 1 s later; from dhtnode,
  within milliseconds.
* ``run`` on an address it cannot bind aborts the process (``DhtException ... Can't bind
  socket`` is not turned into a Python exception): the start fails with that in the message.
* A value's *type* is not readable through the binding: gets report ``type=None`` unless
  ``value_type`` was given as a filter (then every value returned has that type). Listen events
  always have ``type=None``.
* About 4 s after a listen is cancelled the C++ node may call it once more with
  ``expired=True``; the worker drops those.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from ._support import Child, LineSplitter, PeerError, PeerUnavailable, open_child, opendht_available

WORKER = Path(__file__).with_name("_opendht_worker.py")

#: Default bound on one command, in seconds (a failing put of a big value takes about 9 s).
CALL_TIMEOUT = 20.0


def _key_hex(key: bytes) -> str:
    if len(key) != 20:
        raise ValueError(f"a DHT key is 20 bytes, got {len(key)}")
    return bytes(key).hex()


def _decode_value(wire: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": int(wire["id"]),
        "data": base64.b64decode(wire["data"]),
        "type": wire.get("type"),
        "utype": wire.get("utype", ""),
        "owner": wire.get("owner"),
        "recipient": wire.get("recipient"),
    }


class _Reply:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.message: dict[str, Any] | None = None


class OpenDhtPeer:
    """Handle on a running opendht worker. Build it with :func:`open_opendht_peer`."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self.version = ""
        self._child: Child | None = None
        self._next_id = 0
        self._pending: dict[int, _Reply] = {}
        self._listeners: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._ready = trio.Event()
        self._closed = False
        self.certificate_pem = b""
        """The PEM certificate of the node's identity (started with ``identity_bits``), else empty."""

    @property
    def address(self) -> tuple[str, int]:
        """(host, UDP port) to bootstrap other nodes from."""
        return (self.host, self.port)

    # -- plumbing -------------------------------------------------------------------------

    def _on_line(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return  # not protocol: the worker's fd 1 is stderr, so this should not happen
        if not isinstance(message, dict):
            return
        event = message.get("event")
        if event == "ready":
            self.version = str(message.get("version", ""))
            self._ready.set()
        elif event == "value":
            channel = self._listeners.get(message.get("listen", -1))
            if channel is not None:
                event_dict = _decode_value(message["value"])
                event_dict["expired"] = bool(message.get("expired"))
                channel.send_nowait(event_dict)
        elif "id" in message:
            reply = self._pending.get(message["id"])
            if reply is not None:
                reply.message = message
                reply.done.set()

    def _on_eof(self) -> None:
        self._closed = True
        self._ready.set()
        for reply in self._pending.values():
            reply.done.set()
        for channel in self._listeners.values():
            channel.close()

    async def _call(self, command: str, timeout: float = CALL_TIMEOUT, **arguments: Any) -> Any:
        child = self._child
        assert child is not None
        if self._closed:
            raise child.error(f"{command}: the worker has exited")
        self._next_id += 1
        request_id = self._next_id
        reply = self._pending[request_id] = _Reply()
        try:
            with trio.fail_after(timeout):
                await child.send_line(json.dumps({"id": request_id, "cmd": command, **arguments}))
                await reply.done.wait()
        except trio.TooSlowError:
            raise child.error(f"{command}: no reply within {timeout} s") from None
        finally:
            del self._pending[request_id]
        if reply.message is None:
            raise child.error(f"{command}: the worker exited before replying")
        if not reply.message.get("ok"):
            raise child.error(f"{command}: {reply.message.get('error')}")
        return reply.message.get("result")

    # -- API ------------------------------------------------------------------------------

    async def bootstrap(self, host: str, port: int) -> None:
        """Ping ``host:port`` and add it to the routing table (returns at once)."""
        await self._call("bootstrap", host=host, port=port)

    async def put(self, key: bytes, data: bytes, **options: Any) -> bool:
        """Put a value; True when the DHT put succeeded (stored on at least one other node). ``options`` as
        :meth:`put_value`."""
        return bool((await self.put_value(key, data, **options))["ok"])

    async def put_value(
        self,
        key: bytes,
        data: bytes,
        *,
        value_type: int = 0,
        utype: str = "",
        value_id: int | None = None,
        permanent: bool = False,
        timeout: float = CALL_TIMEOUT,
    ) -> dict[str, Any]:
        """Like :meth:`put` but returns ``{"ok": bool, "id": value id}`` (a random id if none given)."""
        return await self._call(
            "put",
            timeout=timeout,
            key=_key_hex(key),
            data=base64.b64encode(data).decode(),
            type=value_type,
            utype=utype,
            value_id=value_id,
            permanent=permanent,
        )

    async def put_signed(self, key: bytes, data: bytes, *, value_id: int | None = None) -> dict[str, Any]:
        """``putSigned`` with the node's identity; ``{"ok", "id"}``."""
        return await self._call(
            "put_signed", key=_key_hex(key), data=base64.b64encode(data).decode(), value_id=value_id
        )

    async def put_encrypted(
        self, key: bytes, data: bytes, to_long_id: bytes, *, value_id: int | None = None
    ) -> dict[str, Any]:
        """``putEncrypted`` for the key whose long id (SHA-256 of its public key) is ``to_long_id``; the
        node looks its certificate up on the DHT. ``{"ok", "id"}``."""
        return await self._call(
            "put_encrypted",
            key=_key_hex(key),
            data=base64.b64encode(data).decode(),
            to=bytes(to_long_id).hex(),
            value_id=value_id,
        )

    async def get(
        self,
        key: bytes,
        *,
        value_type: int | None = None,
        value_id: int | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> list[dict[str, Any]]:
        """Values at ``key`` (network and local), as ``{"id", "data", "type", "utype", "owner"}`` dicts
        (``owner``: a signed value's owner key id in hex, its signature checked by the node; else None)."""
        result = await self._call(
            "get", timeout=timeout, key=_key_hex(key), type=value_type, value_id=value_id
        )
        return [_decode_value(value) for value in result["values"]]

    @asynccontextmanager
    async def listen(
        self, key: bytes, *, timeout: float = CALL_TIMEOUT
    ) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """Listen on ``key``: yields an async iterator of ``{"id", "data", "type", "utype", "expired"}``.

        Existing values arrive first. The iterator ends if the worker exits.
        """
        self._next_id += 1
        listen_id = self._next_id
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._listeners[listen_id] = send
        try:
            await self._call("listen", timeout=timeout, key=_key_hex(key), listen=listen_id)
            async with receive:
                yield receive
        finally:
            self._listeners.pop(listen_id, None)
            send.close()
            if not self._closed:
                # Shielded so a cancelled caller still cancels; an error here must not mask theirs.
                with trio.CancelScope(shield=True), contextlib.suppress(PeerError):
                    await self._call("cancel_listen", timeout=timeout, listen=listen_id)

    async def node_id(self) -> bytes:
        """The node's 20-byte id."""
        return bytes.fromhex(await self._call("node_id"))

    async def routing(self) -> dict[str, Any]:
        """``{"ipv4": {"good", "dubious", "expired"}, "ipv6": {...}, "message_stats": [...]}``."""
        return await self._call("routing")

    async def good_nodes(self) -> int:
        """Number of good nodes in the routing tables (both families)."""
        routing = await self.routing()
        return int(routing["ipv4"]["good"]) + int(routing["ipv6"]["good"])

    async def wait_for_nodes(self, count: int = 1, *, timeout: float = 15.0) -> None:
        """Wait until at least ``count`` good nodes are known (polling every 50 ms)."""
        try:
            with trio.fail_after(timeout):
                while await self.good_nodes() < count:
                    await trio.sleep(0.05)
        except trio.TooSlowError:
            assert self._child is not None
            raise self._child.error(f"fewer than {count} good node(s) after {timeout} s") from None

    async def storage_log(self) -> str:
        """The node's storage dump (text)."""
        return await self._call("storage_log")

    async def _stop(self, child: Child) -> None:
        if not self._closed:
            with contextlib.suppress(PeerError):
                await self._call("shutdown", timeout=5.0)
        await child.close_stdin()


@asynccontextmanager
async def open_opendht_peer(
    port: int = 0,
    *,
    bootstrap: tuple[str, int] | None = None,
    network: int = 0,
    host: str = "127.0.0.1",
    rate_limit: bool = True,
    log: bool | str = False,
    node_id: bytes | None = None,
    identity_bits: int = 0,
    start_timeout: float = 15.0,
) -> AsyncIterator[OpenDhtPeer]:
    """Run a PyPI opendht node on ``host:port`` (0: any free port) for the length of the block.

    ``bootstrap`` pings that node at start (without waiting: see :meth:`OpenDhtPeer.wait_for_nodes`).
    ``rate_limit=False`` lifts the per-IP request limits (like ``dhtnode -U``). ``log`` sends the
    C++ log to the worker's stderr (``True``) or to a file (a path). ``node_id`` fixes the
    20-byte node id (random otherwise). ``host="::1"`` runs the node on IPv6 loopback only.
    ``identity_bits`` runs it with a new identity of that many bits (its certificate:
    :attr:`OpenDhtPeer.certificate_pem`).
    """
    if not opendht_available():
        raise PeerUnavailable("PyPI opendht is not installed for this interpreter")
    peer = OpenDhtPeer(host)
    async with open_child(
        [sys.executable, "-u", str(WORKER)],
        name="opendht worker",
        on_stdout=LineSplitter(peer._on_line, peer._on_eof).feed,
        stop=peer._stop,
    ) as child:
        peer._child = child
        try:
            with trio.fail_after(start_timeout):
                await peer._ready.wait()
        except trio.TooSlowError:
            raise child.error(f"not ready after {start_timeout} s") from None
        if peer._closed:
            raise child.error("exited at start")
        started = await peer._call(
            "start",
            timeout=start_timeout,
            port=port,
            host=host,
            network=network,
            rate_limit=rate_limit,
            log=log,
            node_id=_key_hex(node_id) if node_id is not None else None,
            identity_bits=identity_bits,
        )
        peer.port = int(started["port"])
        peer.certificate_pem = str(started.get("certificate", "")).encode()
        if bootstrap is not None:
            await peer.bootstrap(*bootstrap)
        yield peer
