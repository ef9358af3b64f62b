"""What the bench scripts share: ports, processes (started together), CPU readings, the machine, and how to
start our server.

``TRIO_DHT_CMD`` (set by ``bench/run.py`` to run the zipapp) overrides how our server is started; by default
it is ``python -m trio_dht`` from this checkout.
"""

from __future__ import annotations

import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

import udp_load

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


#: Every load client here connects from 127.0.0.1, standing in for many clients: our per-address caps
#: (connections, listen streams, subscriptions), which dhtnode does not have, are lifted for them.
ONE_ADDRESS_IS_MANY = [
    "--limit", "http_connections_per_ip=1000000",
    "--limit", "http_listens_per_ip=1000000",
    "--limit", "subscriptions_per_source=1000000",
]  # fmt: skip


def our_command() -> list[str]:
    """The command that starts trio_dht (flags are appended by the caller)."""
    command = shlex.split(os.environ.get("TRIO_DHT_CMD", "")) or [sys.executable, "-m", "trio_dht"]
    return [*command, *ONE_ADDRESS_IS_MANY]


def our_env() -> dict[str, str]:
    """Environment for our server: this checkout importable when run as ``python -m trio_dht``."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (our proxy's HTTP worker), whichever of its threads started them
    (Trio starts processes from a worker thread)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU of ``pid`` plus its live children's."""
    return cpu_seconds(pid) + sum(tree_cpu_seconds(child) for child in children(pid))


def rss_kb(pid: int | str = "self") -> int:
    """VmRSS of ``pid`` (default: this process), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def tree_rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` plus its live children's, in KiB."""
    return rss_kb(pid) + sum(tree_rss_kb(child) for child in children(pid))


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLK_TCK


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    out = log.open("wb")
    return subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def stop(*procs: subprocess.Popen, grace: float = 0.5) -> None:
    """Stop ``procs`` together: SIGTERM, then SIGKILL to any still running ``grace`` s later (a ``dhtnode``
    that has stored values waits, on SIGTERM, to hand them to peers that may be gone)."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in running:
        with suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
    for proc in running:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextmanager
def processes() -> Iterator[list[subprocess.Popen]]:
    """A list to add started processes to; on exit, all of them are stopped together."""
    procs: list[subprocess.Popen] = []
    try:
        yield procs
    finally:
        stop(*procs)


def start_all(
    procs: list[subprocess.Popen],
    spawners: dict[str, Callable[[], tuple[subprocess.Popen, T]]],
    probe: Callable[[T], bool],
    timeout: float = 30.0,
    attempts: int = 3,
    interval: float = 0.05,
) -> dict[str, tuple[subprocess.Popen, T]]:
    """Start every server at once, then probe each until all are ready (their start-ups overlap).

    ``spawners[name]()`` starts one server on fresh ports and returns its process and what ``probe`` needs to
    ask it whether it is ready (its URL, its port). One that exits, or is not ready within ``timeout`` s
    (e.g. it lost a port race), is started again, up to ``attempts`` times. Every process started is added
    to ``procs`` (see :func:`processes`).
    """

    def launch(name: str) -> tuple[subprocess.Popen, T, float]:
        proc, where = spawners[name]()
        procs.append(proc)
        return proc, where, time.monotonic() + timeout

    pending = {name: (1, *launch(name)) for name in spawners}
    ready: dict[str, tuple[subprocess.Popen, T]] = {}
    while pending:
        for name, (attempt, proc, where, deadline) in list(pending.items()):
            if proc.poll() is None and probe(where):
                ready[name] = proc, where
                del pending[name]
            elif proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                if attempt == attempts:
                    raise RuntimeError(f"{name} did not start: {shlex.join(map(str, proc.args))}")
                pending[name] = (attempt + 1, *launch(name))
        if pending:
            time.sleep(interval)
    return ready


def answers_ping(port: int) -> bool:
    """The DHT node on 127.0.0.1:``port`` answers a ping."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.sendto(udp_load.request(1, "ping", {}), ("127.0.0.1", port))
        try:
            return bool(sock.recv(65536))
        except OSError:
            return False


def start_b_nodes(
    procs: list[subprocess.Popen], names: list[str], workdir: Path
) -> dict[str, tuple[subprocess.Popen, int]]:
    """Node B of each stack: a plain ``dhtnode -s -U``, all started at once; each with its UDP port once
    it answers pings (so that node A's first bootstrap ping gets an answer)."""

    def spawner(name: str) -> Callable[[], tuple[subprocess.Popen, int]]:
        def start() -> tuple[subprocess.Popen, int]:
            port = free_port(socket.SOCK_DGRAM)
            return spawn(["dhtnode", "-s", "-U", "-p", str(port)], workdir / f"{name}-B.log"), port

        return start

    return start_all(procs, {name: spawner(name) for name in names}, answers_ping)


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    dhtnode = subprocess.run(["dhtnode", "--version"], capture_output=True, text=True).stdout.strip()
    memory_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 30
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {memory_gib} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {dhtnode.splitlines()[0] if dhtnode else 'dhtnode'}"
    )


def append_to_results(section: str) -> None:
    """Append ``section`` (markdown) to ``bench/RESULTS.md``, which a script run on its own extends."""
    results_md = HERE / "RESULTS.md"
    existing = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    results_md.write_text(existing.rstrip("\n") + "\n" + section)
    print(f"appended to {results_md}")
