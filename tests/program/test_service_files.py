"""The service files beside the zipapp: the systemd units and the Containerfile run the program with flags
it accepts, at its real defaults, with the directives they promise; CPython with the program's native
packages runs where memory cannot be writable and executable (the hardened unit's MemoryDenyWriteExecute);
and every system call and address family of a traced run is one the hardened unit's filters allow."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from cli_process import READY, free_tcp_port, trio_dht_process

from trio_dht.cli import DEFAULT_PROXY_PORT, parse_args
from trio_dht.node import DEFAULT_PORT

ZIPAPP = Path(__file__).resolve().parents[2] / "zipapp"
UNITS = ("trio-dht.service", "trio-dht-hardened.service")
PYZ = "/usr/local/lib/trio-dht/trio_dht.pyz"
HARDENING = {
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "PrivateTmp": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "StateDirectory": "trio-dht",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "CapabilityBoundingSet": "",
    "SystemCallArchitectures": "native",
    "MemoryDenyWriteExecute": "yes",
    "LockPersonality": "yes",
    "RestrictSUIDSGID": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
}


def read_unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections, each key with its values in order (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in (ZIPAPP / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), "no continuation lines"
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, line
        section.setdefault(key.strip(), []).append(value.strip())
    return sections


def program_flags(argv: list[str]) -> list[str]:
    assert argv[:2] == ["/usr/bin/python3", PYZ], argv
    return argv[2:]


def test_the_files_use_the_programs_defaults() -> None:
    assert (DEFAULT_PORT, DEFAULT_PROXY_PORT) == (4222, 8000)  # else update the units and the Containerfile


@pytest.mark.parametrize("name", UNITS)
def test_a_unit_runs_the_zipapp_with_flags_it_accepts_and_notifies(name: str) -> None:
    service = read_unit(name)["Service"]
    (exec_start,) = service["ExecStart"]
    config = parse_args(program_flags(shlex.split(exec_start)))  # the real parser: exits on an unknown flag
    assert (
        config.port == DEFAULT_PORT and config.proxy is not None and config.proxy.port == DEFAULT_PROXY_PORT
    )
    assert config.bootstrap == (("bootstrap.jami.net", 4222),)
    for key, value in {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "CacheDirectory": "trio-dht",
        "Environment": "XDG_CACHE_HOME=/var/cache/trio-dht",  # the cache directory, for the native packages
    }.items():
        assert service[key] == [value], key
    assert read_unit(name)["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_hardened_unit_is_the_plain_one_sandboxed_with_its_state_file() -> None:
    plain, hardened = (read_unit(name)["Service"] for name in UNITS)
    for key, values in plain.items():
        if key != "ExecStart":
            assert hardened[key] == values, key
    for key, value in HARDENING.items():
        assert hardened[key] == [value], key
    (plain_start,), (hardened_start,) = plain["ExecStart"], hardened["ExecStart"]
    flags = program_flags(shlex.split(hardened_start))
    assert flags[: len(program_flags(shlex.split(plain_start)))] == program_flags(shlex.split(plain_start))
    state = parse_args(flags).persist_path
    assert state is not None and state.parent == Path("/var/lib") / hardened["StateDirectory"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verifies_the_units(name: str) -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", str(ZIPAPP / name)], capture_output=True, text=True, timeout=60
    )
    said = [line for line in (done.stdout + done.stderr).splitlines() if name in line]
    assert done.returncode == 0 and not said, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_hardened_units_exposure_is_low() -> None:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(ZIPAPP / UNITS[1])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0 and "offline" in done.stderr:
        pytest.skip("this systemd-analyze cannot assess a unit file offline")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0, done.stdout


def read_containerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ZIPAPP / "Containerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            out.append((instruction.upper(), arguments.strip()))
    return out


def test_the_containerfile() -> None:
    steps = read_containerfile()
    args = dict(arguments.split("=", 1) for instruction, arguments in steps if instruction == "ARG")
    assert args["PYTHON_IMAGE"] == "docker.io/library/python:3.12-slim"
    stages = [arguments for instruction, arguments in steps if instruction == "FROM"]
    assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]  # built by the Python that runs it
    runs = [arguments for instruction, arguments in steps if instruction == "RUN"]
    assert "python3 zipapp/build.py -o /out/trio_dht.pyz" in runs
    assert ("COPY", f"--from=build /out/trio_dht.pyz {PYZ}") in steps
    (user,) = [arguments for instruction, arguments in steps if instruction == "USER"]
    assert user not in ("root", "0") and any(re.search(rf"useradd --system .* {user}( |$)", r) for r in runs)
    final = steps[[i for i, (instruction, _) in enumerate(steps) if instruction == "FROM"][-1] :]
    assert final.index(("USER", user)) < final.index(("RUN", f"python3 {PYZ} --version"))  # the cache, warm
    (entrypoint,) = [json.loads(arguments) for instruction, arguments in steps if instruction == "ENTRYPOINT"]
    (cmd,) = [json.loads(arguments) for instruction, arguments in steps if instruction == "CMD"]
    assert entrypoint == ["python3", PYZ]
    config = parse_args(cmd)
    assert config.proxy is not None
    exposed = {
        arguments for instruction, line in steps if instruction == "EXPOSE" for arguments in line.split()
    }
    assert exposed == {f"{config.port}/udp", f"{config.proxy.port}/tcp"} == {"4222/udp", "8000/tcp"}
    (volume,) = [Path(arguments) for instruction, arguments in steps if instruction == "VOLUME"]
    assert config.persist_path is not None and config.persist_path.parent == volume
    env = dict(arguments.split("=", 1) for instruction, arguments in steps if instruction == "ENV")
    assert env["XDG_CACHE_HOME"] == "/var/cache/trio-dht"


PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
UNDER_MDWE = f"""
import ctypes, mmap, runpy, sys
if ctypes.CDLL(None, use_errno=True).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    sys.exit("a writable and executable mapping was allowed")
sys.argv[0] = "trio-dht"
runpy.run_module("trio_dht", run_name="__main__", alter_sys=True)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
async def test_the_program_runs_where_memory_cannot_be_writable_and_executable() -> None:
    """What MemoryDenyWriteExecute=yes does (systemd asks the kernel with PR_SET_MDWE where it can): the node,
    an identity (cryptography's RSA), msgpack's C extension and the proxy all work."""
    probe = subprocess.run([sys.executable, "-c", UNDER_MDWE, "--version"], capture_output=True, timeout=60)
    if probe.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE")
    assert probe.returncode == 0, probe.stderr
    port = free_tcp_port()
    command = [sys.executable, "-c", UNDER_MDWE, "-p", "0", "--bind", "127.0.0.1", "--no-ipv6", "-i"]
    command += ["--proxyserver", str(port), "--proxy-addr", "127.0.0.1"]
    async with trio_dht_process(command, timeout=60) as node:
        assert READY in node.output, node.output
        assert "msgpack C extension" in node.output
        async with httpx.AsyncClient() as client:
            reply = await client.get(f"http://127.0.0.1:{port}/")
        assert reply.json()["node_id"] == node.node_id
        assert await node.stop() == 0, node.output


def syscall_groups() -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter``: each @group's members (calls and other groups)."""
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    for line in listing.splitlines():
        if line.startswith("@"):
            members = groups[line.strip()] = []
        elif line.strip() and not line.strip().startswith("#"):
            members.append(line.strip())
    return groups


def allowed_syscalls(filters: list[str], groups: dict[str, list[str]]) -> set[str]:
    """The calls a unit's ``SystemCallFilter=`` lines allow (an allow list, then ``~`` deny lists)."""

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        return {call for member in groups[name] for call in expand(member)}

    allowed: set[str] = set()
    for line in filters:
        deny = line.startswith("~")
        calls = {call for name in line.lstrip("~").split() for call in expand(name)}
        allowed = allowed - calls if deny else allowed | calls
    return allowed


@pytest.mark.skipif(
    sys.platform != "linux" or not (shutil.which("strace") and shutil.which("systemd-analyze")),
    reason="needs strace and systemd-analyze",
)
async def test_the_hardened_unit_allows_what_the_program_does(tmp_path: Path) -> None:
    """Every system call and address family of a run (node, identity, state file, proxy and its HTTP worker,
    a GET, a SUBSCRIBE, a name resolved, SIGTERM) is one the hardened unit's filters allow."""
    service = read_unit(UNITS[1])["Service"]
    allowed = allowed_syscalls(service["SystemCallFilter"], syscall_groups())
    families = set(service["RestrictAddressFamilies"][0].split())
    trace, port = tmp_path / "trace", free_tcp_port()
    flags = [
        "-p",
        "0",
        "--bind",
        "127.0.0.1",
        "--no-ipv6",
        "-b",
        "localhost:9",
        "-i",
        "-f",
        str(tmp_path / "s"),
    ]
    flags += ["--proxyserver", str(port), "--proxy-addr", "127.0.0.1", "--http-workers", "1"]
    command = ["strace", "-f", "-qq", "-o", str(trace), sys.executable, "-m", "trio_dht", *flags]
    async with trio_dht_process(command, timeout=60) as node:
        assert READY in node.output, node.output
        (program,) = Path(f"/proc/{node.process.pid}/task/{node.process.pid}/children").read_text().split()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert (await http.get("/")).status_code == 200
            body = {"key": "token", "platform": "android", "client_id": "c"}
            assert (await http.request("SUBSCRIBE", f"/key/{'ab' * 20}", json=body)).status_code == 200
        os.kill(int(program), signal.SIGTERM)
        with trio.fail_after(30):
            await node.output_closed.wait()
            assert await node.process.wait() == 0, node.output
    calls = trace.read_text().splitlines()
    used = {m.group(1) for line in calls if (m := re.match(r"\d+ +(\w+)\(", line))}
    # SQLite gives the files it creates to their directory's owner only when it runs as root (fchown): under
    # DynamicUser it does not, and it ignores a refusal.
    assert {"epoll_wait", "sendto", "recvmsg", "sendmsg", "pwrite64"} <= used  # the whole run was traced
    assert used - allowed <= {"fchown"}, sorted(used - allowed)
    opened = {m.group(1) for line in calls if (m := re.search(r" socket(?:pair)?\((AF_\w+)", line))}
    assert opened <= families, opened
