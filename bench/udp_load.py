"""UDP load client: keeps a window of OpenDHT requests in flight against one node and counts the replies.

Used by ``bench/udp_bench.py`` against our node and Debian's ``dhtnode`` alike (the same client for both).
Plain blocking sockets, no Trio: the client must cost less than the server it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import time

import msgpack

ID = os.urandom(20)


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


def run(host: str, port: int, method: str, seconds: float, window: int, key: bytes, sources: int = 1) -> dict:
    """Load from ``sources`` sockets, each on its own loopback IP (127.0.0.2, ...), as distinct peers."""
    addr = (host, port)
    socks = [_socket(f"127.0.0.{2 + i}") for i in range(sources)]
    tokens = {s: (_token(s, addr, key) if method == "put" else None) for s in socks}
    for s in socks:
        s.setblocking(False)
    sent_at: dict[int, float] = {}
    tid = 100
    latencies: list[float] = []
    done = 0
    lost = 0
    start = time.perf_counter()
    end = start + seconds

    def make(t: int, token: bytes | None) -> bytes:
        if method == "ping":
            return request(t, "ping", {})
        if method == "get":
            return request(t, "get", {"h": key})
        value = {"id": t, "dat": {"body": {"type": 0, "data": b"bench value %d" % t}}}
        return request(t, "put", {"h": key, "values": [value], "token": token})

    while True:
        now = time.perf_counter()
        if now >= end:
            break
        # Forget requests older than 1 s (lost), refill the window.
        for t in [t for t, at in sent_at.items() if now - at > 1.0]:
            del sent_at[t]
            lost += 1
        while len(sent_at) < window:
            tid += 1
            sock = socks[tid % len(socks)]
            sent_at[tid] = time.perf_counter()
            sock.sendto(make(tid, tokens[sock]), addr)
        readable, _, _ = select.select(socks, [], [], 0.05)
        for data in _drain(readable):
            try:
                t = msgpack.unpackb(data, raw=False, strict_map_key=False).get("t")
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
    ap.add_argument("--method", choices=["ping", "get", "put"], default="ping")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--sources", type=int, default=1, help="client sockets, each on its own 127.0.0.x")
    ap.add_argument("--key", default="62656e63682d6b6579" + "00" * 11)
    args = ap.parse_args()
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
            )
        )
    )


if __name__ == "__main__":
    main()
