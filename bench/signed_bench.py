"""Signed values on one storing node: ours against Debian's ``dhtnode`` 2.4.12, in the same run.

Before timing, a 4096-bit identity (OpenDHT's default size) signs ``--values`` distinct values once (RSA
PKCS#1 v1.5, SHA-512: their data differ, so their signatures do). Then, for each server, the same load client
(``udp_load.py``, a separate process, 16 loopback source addresses, 64 requests in flight):

* ``signed-put``: puts those values, in turn, each under a new key and value id (the id is not signed), so
  every put is a new value the node must store, and a storing node checks a signed value's signature before
  it stores it: one RSA verify per accepted put. A 4096-bit signed value (about 1.1 KB) does not fit one
  datagram's inline limit, so each put is its request then one ``p`` fragment, as OpenDHT sends it. Counted:
  the puts the node accepted (success replies) per second, and the node's CPU time (``/proc``) per accepted
  put, that is per verify.
* ``signed-get``: stores 128 of those values under 128 keys, then asks for those keys in turn; a get counts
  once its value has arrived whole (the reply then its fragment) with one of the signatures and data put.

Why the gets are measured on the storing node and not on a client node that verifies what it gets: the
storing node checked each value when it was put, and neither implementation checks it again to answer a get,
so the storing node's cost of a get of a signed value is answering with a value that must be fragmented, the
same work on both sides, driven by the same client. A client's check of a value it gets is one RSA verify
of the kind the put workload already measures; a client node's gets per second would instead measure its
lookup machinery and how it is driven (``dhtnode``'s interactive prompt against our library API), which
would swamp the verify either way. The load client checks each answer against the values it put (signature
and data) by comparison, not with RSA, so that it is not the bottleneck.

Our node remembers verify results per (owner, signature, signed bytes); ``dhtnode`` verifies every value it
is sent. A stream of values never seen before is what this workload models, so ours runs with that cache
smaller than the number of distinct values the client cycles through (``--limit verify_cache``): the cache
is still looked up, filled and evicted for every put, and never hits (the run reads ``verify_cache_hits``
from ``/node/stats`` after the puts and reports it). Both servers run with rate limits off (``-U``) and
with the same saved identity of their own (``--certificate``/``--privkey``), which a storing node's check
does not need.

Ours is started with ``TRIO_DHT_CMD`` (see ``common.py``), ``dhtnode`` as ``dhtnode -s``; the RSA verify ours
uses is ``cryptography``'s (OpenSSL) when that interpreter can import it, else trio_dht's pure-Python one,
and the run records which. When ours is the zipapp, a third server, ``trio_dht -S``, runs it as on a bare
CPython of another version (``python -S`` and ``TRIO_DHT_NATIVE=0``: no site-packages and not the zipapp's
own ``cryptography``, so pure-Python RSA and no identity of its own); it is in the details table, not in the
summary. One server at a time; ``--quick`` (a smoke run)
starts them all at once, 0.5 s per workload and 256 values.

    python bench/signed_bench.py [--seconds 5] [--values 1024] [--quick] [--output FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from common import (
    HERE,
    ROOT,
    answers_ping,
    cpu_seconds,
    free_port,
    machine,
    our_command,
    our_env,
    processes,
    spawn,
    start_all,
)

KINDS = ("dhtnode", "trio_dht")
BARE = "trio_dht -S"
"""Our zipapp as on a bare CPython (``python -S``, ``TRIO_DHT_NATIVE=0``): its pure-Python RSA verify."""
METHODS = ("signed-put", "signed-get")
BITS = 4096
DATA_BYTES = 64
GET_KEYS = 128


def sign_values(count: int, workdir: Path) -> tuple[Path, Path, Path]:
    """Sign ``count`` distinct values with a new 4096-bit identity; write their serialised ``dat`` maps (the
    load client's ``--values``) and a second identity for the servers. Returns (values, key, certificate)."""
    sys.path.insert(0, str(ROOT))
    from trio_dht.crypto import Identity
    from trio_dht.value import Value
    from trio_dht.wire.msgpack_codec import packb

    signer = Identity.generate("bench signer", BITS)
    dats = [
        packb(
            signer.sign_value(
                Value(data=(b"signed bench value %08d " % i).ljust(DATA_BYTES, b"."))
            ).to_wire()["dat"]
        )
        for i in range(count)
    ]
    values = workdir / "values.msgpack"
    values.write_bytes(packb(dats))
    key, cert = workdir / "node.pem", workdir / "node.crt"
    Identity.generate("bench node", BITS).save(key, cert)
    return values, key, cert


def command(kind: str) -> list[str]:
    """How our server of ``kind`` starts: :func:`our_command`, with ``-S`` after the interpreter for BARE."""
    ours = our_command()
    return [ours[0], "-S", *ours[1:]] if kind == BARE else ours


def zipapp() -> bool:
    """Whether our server is the zipapp (so that it also runs without site-packages)."""
    return our_command()[1].endswith(".pyz")


def server_env(kind: str) -> dict[str, str]:
    """Our server's environment: for BARE, without the zipapp's native packages."""
    return {**our_env(), "TRIO_DHT_NATIVE": "0"} if kind == BARE else our_env()


def verifier(kind: str) -> str:
    """Which RSA verify our server of ``kind`` uses, asked of the code it runs (the zipapp loads its own
    ``cryptography`` first, as its entry point does)."""
    cmd = command(kind)
    code = "from trio_dht import signature; print(signature.backend.name)"
    if zipapp():
        load = "import sys; sys.path.insert(0, sys.argv[1]); import _trio_dht_native as n; n.enable()"
        code = f"{load}; {code}"
        at = next(i for i, part in enumerate(cmd) if part.endswith(".pyz"))
        probe = [*cmd[:at], "-c", code, cmd[at]]
    else:
        probe = [cmd[0], "-c", code]
    done = subprocess.run(probe, capture_output=True, text=True, env=server_env(kind))
    found = done.stdout.strip() == "cryptography"
    return "cryptography (OpenSSL)" if found else "pure Python (trio_dht.purecrypto)"


def spawner(
    kind: str, identity: tuple[Path, Path], verify_cache: int, workdir: Path
) -> Callable[[], tuple[subprocess.Popen, tuple[int, int]]]:
    """Starts one server of ``kind`` on fresh ports: (UDP port, HTTP port of ours' stats or 0)."""
    key, cert = identity

    def start() -> tuple[subprocess.Popen, tuple[int, int]]:
        port = free_port(socket.SOCK_DGRAM)
        flags = ["-U", "-p", str(port)]
        if kind != BARE:  # loading an identity needs cryptography
            flags += ["--certificate", str(cert), "--privkey", str(key)]
        if kind == "dhtnode":
            return spawn(["dhtnode", "-s", *flags], workdir / f"{kind}.log"), (port, 0)
        http = free_port()
        cmd = [
            *command(kind),
            *flags,
            "--bind",
            "127.0.0.1",
            "--no-ipv6",
            "--limit",
            f"verify_cache={verify_cache}",
        ]
        cmd += ["--proxyserver", str(http), "--proxy-addr", "127.0.0.1", "--http-workers", "0"]
        return spawn(cmd, workdir / f"{kind.replace(' ', '')}.log", server_env(kind)), (port, http)

    return start


def load(port: int, method: str, seconds: float, values: Path) -> dict:
    cmd = [
        sys.executable,
        str(HERE / "udp_load.py"),
        str(port),
        "--method",
        method,
        "--seconds",
        str(seconds),
    ]
    cmd += ["--sources", "16", "--window", "64", "--values", str(values), "--get-keys", str(GET_KEYS)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
    return json.loads(out.stdout)


def is_ready(ports: tuple[int, int]) -> bool:
    """The node answers a ping and, for ours, its HTTP port answers ``/node/stats``: the HTTP port is bound
    after the UDP one, so a server that lost the race for it exits after answering pings (and is started
    again)."""
    udp, http_port = ports
    if not answers_ping(udp):
        return False
    try:
        return not http_port or isinstance(node_info(http_port), dict)
    except (OSError, ValueError, http.client.HTTPException):
        return False


def node_info(http_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/node/stats", timeout=5) as response:
        return json.load(response).get("nodeInfo", {})


def measure(
    kinds: list[str],
    seconds: float,
    settle: float,
    values: Path,
    identity: tuple[Path, Path],
    verify_cache: int,
    workdir: Path,
) -> dict[str, dict]:
    """Start ``kinds`` together; once they answer pings and ``settle`` s later, load each in turn with signed
    puts, then signed gets."""
    results: dict[str, dict] = {kind: {} for kind in kinds}
    with processes() as procs:
        servers = start_all(
            procs,
            {kind: spawner(kind, identity, verify_cache, workdir) for kind in kinds},
            is_ready,
        )
        time.sleep(settle)
        for method in METHODS:
            for kind in kinds:
                proc, (port, http) = servers[kind]
                before = cpu_seconds(proc.pid)
                r = load(port, method, seconds, values)
                r["cpu_us_per_req"] = (cpu_seconds(proc.pid) - before) / max(1, r["replies"]) * 1e6
                results[kind][method] = r
                if http and method == "signed-put":  # before the gets store their values
                    results[kind]["verify_cache_hits"] = node_info(http).get("verify_cache_hits")
    return results


def table(results: dict[str, dict], distinct: int) -> str:
    d = results["dhtnode"]
    ours = [kind for kind in (*KINDS[1:], BARE) if kind in results]
    lines = [
        f"4096-bit RSA signatures, {distinct} distinct signed values; limits off (`-U`). Our RSA verify: "
        + "; ".join(f"`{kind}` {results[kind]['verifier']}" for kind in ours)
        + ". Our verify-cache hits during the puts: "
        + ", ".join(f"`{kind}` {results[kind].get('verify_cache_hits')}" for kind in ours)
        + ".",
        "",
        "| workload | ours | dhtnode req/s | ours req/s | ratio | dhtnode µs CPU/req | ours µs CPU/req "
        "| p50 ms dhtnode / ours | errors or wrong answers dhtnode / ours |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    names = {"signed-put": "signed put accepted (one verify each)", "signed-get": "get of a signed value"}
    for m, label in names.items():
        for kind in ours:
            o = results[kind]
            lines.append(
                f"| {label} | `{kind}` | {d[m]['rps']:.0f} | {o[m]['rps']:.0f} "
                f"| {o[m]['rps'] / d[m]['rps']:.2f} "
                f"| {d[m]['cpu_us_per_req']:.1f} | {o[m]['cpu_us_per_req']:.1f} "
                f"| {d[m]['p50_ms']:.2f} / {o[m]['p50_ms']:.2f} | {d[m]['errors']} / {o[m]['errors']} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--values", type=int, default=1024, help="distinct signed values (signing: ~2 ms each)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: both servers at once, 0.5 s each")
    ap.add_argument("--output", type=Path, default=HERE / "signed_results.json")
    args = ap.parse_args()
    if shutil.which("dhtnode") is None:
        sys.exit("dhtnode is not installed: apt-get install dhtnode")
    distinct = 256 if args.quick else args.values
    verify_cache = max(1, distinct // 8)  # cycling through more values than it holds: never a hit
    kinds = [*KINDS, BARE] if zipapp() else list(KINDS)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        started = time.monotonic()
        values, key, cert = sign_values(distinct, workdir)
        print(f"signed {distinct} values in {time.monotonic() - started:.1f} s", flush=True)
        if args.quick:
            results = measure(kinds, 0.5, 0.0, values, (key, cert), verify_cache, workdir)
        else:  # one server at a time, 1.5 s after it answers
            results = {}
            for kind in kinds:
                results |= measure([kind], args.seconds, 1.5, values, (key, cert), verify_cache, workdir)
    for kind in kinds[1:]:
        results[kind]["verifier"] = verifier(kind)
    text = table(results, distinct)
    print(text)
    args.output.write_text(
        json.dumps(
            {
                "machine": machine(),
                "distinct_values": distinct,
                "results": results,
                "table": text,
                "command": shlex.join(our_command()),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
