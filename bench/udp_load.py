"""UDP load client: keeps a window of OpenDHT requests in flight against one node and counts the replies.

Used by ``bench/udp_bench.py`` and ``bench/signed_bench.py`` against our node and Debian's ``dhtnode`` alike
(the same client for both). Plain blocking sockets, no Trio: the client must cost less than the server it
measures.

Methods: ``ping``; ``get`` and ``put`` of small values on one key; ``signed-put`` and ``signed-get`` of
pre-signed values read from ``--values`` (a msgpack array of serialised ``dat`` maps, each a value's body and
signature). A ``signed-put`` stores one of them, in turn, under a new key and value id per request (the id is
not signed); a value too large for one datagram travels as the protocol sends it: the request's ``values``
holds its size and ``p`` fragments of at most 1280 bytes follow the request. Only success replies count as
answered (errors are counted apart). A ``signed-get`` first stores ``--get-keys`` of them (each source
stores its share, presenting its token, which validates its address), then asks for those keys in turn; a
get counts once its value has arrived whole (inline or in fragments) and carries one of the signatures and
data that were put.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import msgpack

ID = os.urandom(20)
FRAGMENT_SIZE = 1280
"""The largest fragment a node sends (``p`` messages)."""
INLINE_MAX_BYTES = 600
"""Values whose serialised sizes sum to less go inline in a request's ``values``."""


def request(tid: int, method: str, args: dict) -> bytes:
    return msgpack.packb(
        {"a": {"id": ID, **args}, "q": method, "t": tid, "y": "q", "v": "bench"}, use_bin_type=True
    )


def _socket(source_ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((source_ip, 0))
    return sock


def _token(sock: socket.socket, addr: tuple[str, int], key: bytes) -> bytes:
    """A write token for this socket (tokens are bound to the requester's IP and port)."""
    sock.settimeout(1)
    for _ in range(5):  # the server may still be dropping requests of a previous run (rate limits)
        sock.sendto(request(1, "get", {"h": key}), addr)
        try:
            reply = msgpack.unpackb(sock.recv(65536), raw=False, strict_map_key=False)
        except TimeoutError:
            continue
        return reply["r"]["token"]
    raise TimeoutError(f"no token from {addr}")


def _value(vid: int, dat: bytes) -> bytes:
    """A serialised value map ``{"id": vid, "dat": ...}`` around a pre-serialised ``dat`` map."""
    return b"\x82" + msgpack.packb("id") + msgpack.packb(vid) + msgpack.packb("dat") + dat


def signed_put(tid: int, key: bytes, value: bytes, token: bytes | None) -> list[bytes]:
    """A put of one serialised value: inline if small, else the request (its size) then its fragments."""
    if len(value) < INLINE_MAX_BYTES:
        return [request(tid, "put", {"h": key, "values": [msgpack.unpackb(value)], "token": token})]
    out = [request(tid, "put", {"h": key, "values": [len(value)], "token": token})]
    for offset in range(0, len(value), FRAGMENT_SIZE):
        part = {0: {"o": offset, "d": value[offset : offset + FRAGMENT_SIZE]}}
        out.append(msgpack.packb({"y": "p", "t": tid, "p": part}, use_bin_type=True))
    return out


def read_values(path: Path) -> list[bytes]:
    """The serialised ``dat`` maps of ``--values``."""
    return msgpack.unpackb(path.read_bytes(), raw=False)


class _Answers:
    """Get answers carrying one value, inline or in fragments, matched against the signatures put."""

    def __init__(self, dats: Sequence[bytes]) -> None:
        self.data_of: dict[bytes, bytes] = {}
        for dat in dats:
            obj = msgpack.unpackb(dat, raw=False, strict_map_key=False)
            self.data_of[obj["sig"]] = obj["body"]["data"]
        self.sizes: dict[int, int] = {}
        self.parts: dict[int, list[bytes]] = {}
        self.wrong = 0

    def reply(self, msg: dict) -> int | None:
        """A get reply: its tid if it carries its value inline (or it is complete), else None."""
        tid = msg.get("t")
        values = msg.get("r", {}).get("values") or []
        if len(values) != 1:
            self.wrong += 1
            return None
        if isinstance(values[0], dict):
            return tid if self._check(values[0]) else None
        self.sizes[tid] = values[0]
        return self._complete(tid)

    def fragment(self, msg: dict) -> int | None:
        tid = msg.get("t")
        for part in msg.get("p", {}).values():
            self.parts.setdefault(tid, []).append(part["d"])
        return self._complete(tid)

    def _complete(self, tid: int) -> int | None:
        size = self.sizes.get(tid)
        parts = self.parts.get(tid, [])
        if size is None or sum(map(len, parts)) < size:
            return None
        del self.sizes[tid]
        del self.parts[tid]
        value = msgpack.unpackb(b"".join(parts), raw=False, strict_map_key=False)
        return tid if self._check(value) else None

    def _check(self, value: dict) -> bool:
        dat = value.get("dat", {})
        ok = self.data_of.get(dat.get("sig")) == dat.get("body", {}).get("data")
        self.wrong += not ok
        return ok

    def forget(self, tid: int) -> None:
        self.sizes.pop(tid, None)
        self.parts.pop(tid, None)


def _store(socks: list[socket.socket], addr: tuple[str, int], puts: list[tuple[bytes, bytes]]) -> None:
    """Store ``(key, serialised value)`` pairs, spread over ``socks`` (each with its token), resending
    until each is answered."""
    tokens = {s: _token(s, addr, puts[0][0]) for s in socks}
    waiting = dict(enumerate(puts, start=1))
    for _ in range(10):
        for tid, (key, value) in waiting.items():
            sock = socks[tid % len(socks)]
            for datagram in signed_put(tid, key, value, tokens[sock]):
                sock.sendto(datagram, addr)
        deadline = time.monotonic() + 1.0
        for sock in socks:
            sock.setblocking(False)
        while waiting and time.monotonic() < deadline:
            readable, _, _ = select.select(socks, [], [], 0.05)
            for data in _drain(readable):
                msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
                if msg.get("y") == "r":
                    waiting.pop(msg.get("t"), None)
        if not waiting:
            return
    raise TimeoutError(f"{len(waiting)} of {len(puts)} values not stored on {addr}")


def run(
    host: str,
    port: int,
    method: str,
    seconds: float,
    window: int,
    key: bytes,
    sources: int = 1,
    values: Sequence[bytes] = (),
    get_keys: int = 128,
) -> dict:
    """Load from ``sources`` sockets, each on its own loopback IP (127.0.0.2, ...), as distinct peers."""
    addr = (host, port)
    socks = [_socket(f"127.0.0.{2 + i}") for i in range(sources)]
    tokens = {s: (_token(s, addr, key) if method in ("put", "signed-put") else None) for s in socks}
    nonce = os.urandom(12)  # keys of this run: nonce + 8-byte counter
    answers = _Answers(values) if method == "signed-get" else None
    get_targets: list[bytes] = []
    if method == "signed-get":
        get_targets = [nonce + i.to_bytes(8, "big") for i in range(get_keys)]
        _store(socks, addr, [(k, _value(i + 1, values[i % len(values)])) for i, k in enumerate(get_targets)])
    for s in socks:
        s.setblocking(False)
    sent_at: dict[int, float] = {}
    tid = 100
    latencies: list[float] = []
    done = 0
    lost = 0
    errors = 0
    start = time.perf_counter()
    end = start + seconds

    def make(t: int, token: bytes | None) -> list[bytes]:
        if method == "ping":
            return [request(t, "ping", {})]
        if method == "get":
            return [request(t, "get", {"h": key})]
        if method == "put":
            value = {"id": t, "dat": {"body": {"type": 0, "data": b"bench value %d" % t}}}
            return [request(t, "put", {"h": key, "values": [value], "token": token})]
        if method == "signed-put":
            return signed_put(t, nonce + t.to_bytes(8, "big"), _value(t, values[t % len(values)]), token)
        return [request(t, "get", {"h": get_targets[t % len(get_targets)]})]

    while True:
        now = time.perf_counter()
        if now >= end:
            break
        # Forget requests older than 1 s (lost), refill the window.
        for t in [t for t, at in sent_at.items() if now - at > 1.0]:
            del sent_at[t]
            lost += 1
            if answers is not None:
                answers.forget(t)
        while len(sent_at) < window:
            tid += 1
            sock = socks[tid % len(socks)]
            sent_at[tid] = time.perf_counter()
            for datagram in make(tid, tokens[sock]):
                sock.sendto(datagram, addr)
        readable, _, _ = select.select(socks, [], [], 0.05)
        for data in _drain(readable):
            try:
                msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
                t = msg.get("t")
                if answers is not None:
                    kind = msg.get("y")
                    answers.wrong += kind == "e"
                    t = answers.reply(msg) if kind == "r" else answers.fragment(msg) if kind == "p" else None
                elif method == "signed-put" and msg.get("y") != "r":
                    if msg.get("y") == "e":  # a refusal
                        errors += sent_at.pop(t, None) is not None
                    continue
            except Exception:
                continue
            at = sent_at.pop(t, None)
            if at is not None:
                done += 1
                latencies.append(time.perf_counter() - at)
    elapsed = time.perf_counter() - start
    latencies.sort()
    pct = (
        (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3)
        if latencies
        else (lambda q: 0)
    )
    return {
        "method": method,
        "replies": done,
        "lost": lost,
        "errors": errors + (answers.wrong if answers is not None else 0),
        "seconds": elapsed,
        "rps": done / elapsed,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
    }


def _drain(socks: list[socket.socket]):
    for sock in socks:
        while True:
            try:
                yield sock.recv(65536)
            except BlockingIOError:
                break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("port", type=int)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--method", choices=["ping", "get", "put", "signed-put", "signed-get"], default="ping")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--sources", type=int, default=1, help="client sockets, each on its own 127.0.0.x")
    ap.add_argument("--key", default="62656e63682d6b6579" + "00" * 11)
    ap.add_argument("--values", type=Path, help="signed-put/-get: a msgpack array of serialised dat maps")
    ap.add_argument("--get-keys", type=int, default=128, help="signed-get: keys stored, then asked for")
    args = ap.parse_args()
    if args.method.startswith("signed-") and args.values is None:
        ap.error(f"--method {args.method} needs --values")
    print(
        json.dumps(
            run(
                args.host,
                args.port,
                args.method,
                args.seconds,
                args.window,
                bytes.fromhex(args.key),
                args.sources,
                read_values(args.values) if args.values else [],
                args.get_keys,
            )
        )
    )


if __name__ == "__main__":
    main()
