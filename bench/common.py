"""What the bench scripts share: ports, processes, CPU readings, the machine, and how to start our server.

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
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def our_command() -> list[str]:
    """The command that starts trio_dht (flags are appended by the caller)."""
    return shlex.split(os.environ.get("TRIO_DHT_CMD", "")) or [sys.executable, "-m", "trio_dht"]


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


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, again if ignored (an idle ``dhtnode -s`` ignores the first), then SIGKILL."""
    for _ in range(2):
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(3)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


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
