"""``trio-dht client`` (run as ``python -m trio_dht.client.cli``, which the ``client`` subcommand hands over
to) against our proxy on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_dht.client.cli import key_of
from trio_dht.infohash import InfoHash
from trio_dht.proxy import ProxyConfig, serve_proxy
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import Value

BOUND = 20.0
CLI = [sys.executable, "-m", "trio_dht.client.cli"]


@pytest.fixture
def dht() -> MemoryDht:
    return MemoryDht()


@pytest.fixture
async def proxy_url(nursery: trio.Nursery, dht: MemoryDht) -> str:
    (url,) = await nursery.start(
        serve_proxy, dht, ProxyConfig(host="127.0.0.1", port=0, graceful_timeout=0.5)
    )
    return url


async def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(BOUND):
        return await trio.run_process([*CLI, *args], capture_stdout=True, capture_stderr=True, check=False)


def lines(out: bytes) -> list[dict]:
    return [json.loads(line) for line in out.decode().splitlines()]


async def test_put_get_status(proxy_url: str, dht: MemoryDht) -> None:
    done = await run("--proxy", proxy_url, "put", "greeting", "hello")
    assert done.returncode == 0, done.stderr
    [stored] = lines(done.stdout)
    assert stored["data"] == "aGVsbG8=" and int(stored["id"]) > 0
    assert [v.data for v in dht.values(InfoHash.get("greeting"))] == [b"hello"]
    done = await run("--proxy", proxy_url, "get", "greeting")
    assert done.returncode == 0 and [(d["id"], d["text"]) for d in lines(done.stdout)] == [
        (stored["id"], "hello")
    ]
    done = await run("--proxy", proxy_url, "status")
    assert lines(done.stdout)[0]["status"] == "connected"
    assert key_of("a" * 40) == InfoHash.from_hex("a" * 40) and key_of("greeting") == InfoHash.get("greeting")


async def test_errors_exit_1(proxy_url: str, dht: MemoryDht) -> None:
    dht.fail_puts = True
    done = await run("--proxy", proxy_url, "put", "k", "v")
    assert done.returncode == 1 and b"put failed" in done.stderr
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = await run("--proxy", f"127.0.0.1:{port}", "--timeout", "2", "get", "k")
    assert done.returncode == 1 and b"error: GET /key/" in done.stderr and b"Traceback" not in done.stderr
    assert (await run("--proxy", proxy_url, "frobnicate")).returncode == 2
    done = await run("--proxy", proxy_url, "push", "not json")
    assert done.returncode == 1 and b"not JSON" in done.stderr


async def test_listen_until_ctrl_c(proxy_url: str, dht: MemoryDht) -> None:
    key = InfoHash.get("chan")
    await dht.put(key, Value(b"first", id=1))
    process = await trio.lowlevel.open_process(
        [*CLI, "--proxy", proxy_url, "listen", "chan"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        pending = b""

        async def next_line() -> dict:
            nonlocal pending
            with trio.fail_after(BOUND):
                while b"\n" not in pending:
                    chunk = await process.stdout.receive_some()
                    assert chunk, "listen ended"
                    pending += chunk
            line, pending = pending.split(b"\n", 1)
            return json.loads(line)

        assert (await next_line())["text"] == "first"
        await dht.put(key, Value(b"second", id=2))
        assert (await next_line())["text"] == "second"
        process.send_signal(signal.SIGINT)
        with trio.fail_after(BOUND):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_push_command(proxy_url: str, dht: MemoryDht) -> None:
    key = InfoHash.get("pushed")
    await dht.put(key, Value(b"v", id=3))
    push = json.dumps({"key": key.hex(), "to": "trio-dht", "t": "1", "s": "abc"})
    done = await run("--proxy", proxy_url, "push", push)  # no push token: stream mode ignores pushes
    assert done.returncode == 0, done.stderr
    assert lines(done.stdout) == [
        {"data": "dg==", "id": "3", "text": "v", "type": 0},
        {"result": "ignored-no-op"},
    ]


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> str:
    output = tmp_path_factory.mktemp("client_pyz") / "trio_dht.pyz"
    build = Path(__file__).resolve().parents[2] / "zipapp" / "build.py"
    subprocess.run([sys.executable, build, "-o", output], check=True, timeout=600)
    return str(output)


@pytest.mark.slow
async def test_from_the_zipapp(proxy_url: str, dht: MemoryDht, pyz: str) -> None:
    # -S: no site-packages, so only the zipapp's copies of trio, httpx, ... can be imported
    entry = "import sys; sys.path.insert(0, sys.argv.pop(1)); from trio_dht.client.cli import client_main; "
    entry += "import trio; assert trio.__file__.startswith(sys.path[0]), trio.__file__; "
    entry += "sys.exit(client_main(sys.argv[1:]))"
    command = [sys.executable, "-S", "-c", entry, pyz, "--proxy", proxy_url]
    with trio.fail_after(BOUND):
        done = await trio.run_process([*command, "put", "zip", "zipped"], capture_stdout=True, check=False)
        assert done.returncode == 0
        done = await trio.run_process([*command, "get", "zip"], capture_stdout=True, check=False)
    assert done.returncode == 0 and [d["text"] for d in lines(done.stdout)] == ["zipped"]
