"""Debian's ``dhtnode`` 2.4.12 on loopback, driven from Trio: as a DHT peer, and as a proxy client.

How it is driven, and why
-------------------------
:func:`open_dhtnode_peer` runs ``dhtnode -p PORT [-b HOST:PORT] --proxyserver P --proxy-addr
127.0.0.1`` in its interactive mode. Data operations (put/get/listen) go through its REST proxy
server over HTTP on 127.0.0.1, because the prompt cannot carry them faithfully:

* ``p KEY WORD`` stores only the first whitespace-separated word, as ``text/plain`` type 0;
  there is no way to give bytes, a type, an id or a user type.
* ``g``/``l`` print ``Value[id:HEX data:HEX]``, but ``N bytes`` instead of the data once a value
  reaches 1024 bytes, so a 60 KB value cannot be read back.

The HTTP API carries base64 data, type, id and utype, and
reports the DHT put result (200, or 502 ``Put failed``). The prompt stays open for what HTTP
cannot do: ``b HOST:PORT`` (bootstrap later), ``ll``/``lr``/``ls``/``ld`` (diagnostics), and
a clean exit (``x``, then EOF). :func:`open_dhtnode_proxy_client` runs
``dhtnode --proxyclient URL [--devicekey TOKEN]``, which has only the prompt.

Facts learned by running it
---------------------------
* No tty is needed: readline reads a pipe. It **echoes every input line** to stdout after the
  prompt ``>> ``, and prints ``>> `` before reading each line. Output of asynchronous operations
  (get/put/listen callbacks, ``ll``) comes from another thread and can land **inside** a line:
  ``Get: found 1 value(s) after __sync1`` (echo) ``143 us (total 1)`` was seen. So: one command
  at a time, wait for its completion line before sending more, cut known echoes out of the raw
  stream, drop every ``>> ``, and match completion lines with ``search``, not ``match``. (So a
  text value containing ``>> `` reads back without it.)
* Banner (printed after the proxy server is listening)::

      [Bootstrap: 127.0.0.1:4222]
      OpenDHT node <40 hex> running on port <udp port>
       (type 'h' or 'help' for a list of possible commands)

  ``-p`` absent or ``-p 0``: a random port, reported here. In proxy-client mode the banner says
  node ``000...0`` on port ``0`` and no UDP socket is opened.
* Keys: 40 hex digits are used as is; anything else is hashed and announced with
  ``Using h(<text>) = <hex>``.
* Commands and their output:

  - ``g KEY [WHERE ...]``: ``Get: found N value(s) after T (total M)`` then N lines
    ``\\tValue[id:HEX data(UTYPE):"text"]`` (text/plain) / ``\\tValue[id:HEX data:HEX]`` /
    ``... data:N bytes]`` (>= 1024 bytes); ends with ``Get: completed|failure, took T (total M)``.
  - ``p KEY WORD``: ``Put: success|failure, took T. Value ID: HEX``.
  - ``l KEY``: ``Listen: found N values[ expired] (total M)`` + N value lines, for existing then
    new values (possibly printed before ``Listening, token: N``); ``cl KEY TOKEN`` cancels.
  - ``ll``: ``OpenDHT node ID running on port P``, ``N ongoing operations``, ``Storage has N
    values, using K KB``, then per family ``IPv4 stats:`` / ``Known nodes: G good, D dubious,
    I incoming.`` / ``S searches, C total cached nodes``.
  - ``b HOST:PORT``, ``cl``, ``cc``, ``log``: no output. An unknown word prints ``Unknown
    command: WORD`` and a hint line; we use that as a sync marker after synchronous commands.
  - ``x`` (or EOF on stdin) prints ``Stopping node...`` and exits 0 within a few ms.
* The DHT socket binds ``0.0.0.0:PORT`` and ``[::]:PORT`` (there is no bind flag for it); we
  only ever talk to it over 127.0.0.1. ``--proxy-addr 127.0.0.1`` keeps the proxy on loopback.
* A busy proxy port aborts the process at start (``terminate called ... bind: Address already
  in use``); a free port is picked and the start retried (3 tries).
* In ``-s`` (service) mode an idle node with a proxy twice ignored the first SIGTERM (its main
  thread stayed parked in ``ServiceRunner::wait``); a second signal worked. Another reason for
  the prompt mode and ``x``.
* After ``x``, shutdown sometimes never completes (about 1 run in 3 when a proxy ``/listen``
  stream and a DHT peer were active): ``Stopping node...`` is printed, then the main thread
  waits forever for ``DhtRunner::shutdown``'s callback. We kill it 2 s after ``x``.
* A put through the proxy on a node with no peers answers 502 at once (stored locally anyway).
* The proxy's ``GET /node/info`` is a cache (``nodeInfo_``), refreshed at start, 3 s later and
  then every 2 minutes: it showed 0 good nodes for 3 s after the peer was known. Live node
  counts come from ``ll``.
* A dhtnode peer sees a new peer as good about 1 s after it pinged it (``b``, or an incoming
  request); put/get/listen between a dhtnode and an opendht peer then take milliseconds.
* Proxy client: ``g`` completes when the proxy server's own GET does (8 s once, when that
  server's only DHT peer had just left). With ``--devicekey`` it listens by SUBSCRIBE, and ``l``
  did not show a value put after it: new values need a push, which dhtnode's ``rp`` cannot
  inject (it sends the obsolete ``{"to","token"}`` form).
"""

from __future__ import annotations

import base64
import codecs
import collections
import contextlib
import json
import math
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import trio

from ._support import Child, PeerError, PeerUnavailable, dhtnode_path, free_port, open_child

T = TypeVar("T")

#: Default bound on one operation, in seconds (a failing put of a 70 KB value takes about 9 s).
CALL_TIMEOUT = 20.0

_BANNER = re.compile(r"OpenDHT node ([0-9a-f]{40}) running on port (\d+)")
_VALUE = re.compile(r"Value\[id:([0-9a-f]+) (.*)\]\s*$")
_VALUE_DATA = re.compile(r"data(?:\((.*?)\))?:(.*)$")
_GET_FOUND = re.compile(r"Get: found (\d+) value")
_GET_DONE = re.compile(r"Get: (completed|failure), took")
_PUT_DONE = re.compile(r"Put: (success|failure), took .*Value ID: ([0-9a-f]+)")
_LISTEN_FOUND = re.compile(r"Listen: found (\d+) values( expired)? \(total")
_LISTENING = re.compile(r"Listening, token: (\d+)")
_KNOWN_NODES = re.compile(r"Known nodes: (\d+) good, (\d+) dubious, (\d+) incoming")


def _key_text(key: bytes | str) -> str:
    if isinstance(key, str):
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"a prompt key is one word, got {key!r}")
        return key
    if len(key) != 20:
        raise ValueError(f"a DHT key is 20 bytes, got {len(key)}")
    return bytes(key).hex()


def parse_value_line(line: str) -> dict[str, Any] | None:
    """Parse dhtnode's ``Value[...]`` text: ``{"id", "data" (bytes or None), "size", "utype", "text"}``.

    ``data`` is None when dhtnode printed only a size (values of 1024 bytes or more), or the
    value is encrypted. ``type`` is not printed by dhtnode.
    """
    match = _VALUE.search(line)
    if match is None:
        return None
    value: dict[str, Any] = {"id": int(match.group(1), 16), "data": None, "size": None, "utype": ""}
    value["text"] = match.group(0)
    rest = match.group(2)
    data = _VALUE_DATA.search(rest)
    if data is not None:
        value["utype"] = data.group(1) or ""
        payload = data.group(2)
        if payload.startswith('"') and payload.endswith('"') and len(payload) >= 2:
            value["data"] = payload[1:-1].encode()
        elif (sized := re.fullmatch(r"(\d+) bytes", payload)) is not None:
            value["size"] = int(sized.group(1))
        else:
            with contextlib.suppress(ValueError):
                value["data"] = bytes.fromhex(payload)
        if value["data"] is not None:
            value["size"] = len(value["data"])
    return value


def _json_value(wire: dict[str, Any]) -> dict[str, Any]:
    """A proxy JSON value as ``{"id", "data", "type", "utype"}`` (plus ``"expired"`` when present)."""
    value = {
        "id": int(wire.get("id", 0)),
        "data": base64.b64decode(wire.get("data", "")),
        "type": int(wire.get("type", 0)),
        "utype": str(wire.get("utype", "")),
    }
    if "expired" in wire:
        value["expired"] = bool(wire["expired"])
    return value


class DhtnodePrompt:
    """dhtnode's interactive prompt over pipes. Build it with :func:`open_dhtnode_prompt`.

    ``lines`` holds every output line, cleaned of prompts and of the echo of our input.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.node_id = b""
        self.port = 0
        self._child: Child | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._echoes: collections.deque[str] = collections.deque(maxlen=16)  # bounded if no echo
        self._changed = trio.Event()
        self._eof = False
        self._command_lock = trio.Lock()
        self._sync_count = 0
        # Parser state and parsed records: ("get", value) ("get_done", ok) ("put_done", ok, id)
        # ("listen", value, expired) ("listening", token).
        self.records: list[tuple[Any, ...]] = []
        self._block: tuple[str, bool] | None = None
        self._block_left = 0
        self._listeners: list[trio.MemorySendChannel[dict[str, Any]]] = []

    # -- output ---------------------------------------------------------------------------

    def _on_stdout(self, chunk: bytes) -> None:
        self._text += self._decoder.decode(chunk, final=not chunk)
        while self._echoes:
            echo = self._echoes[0] + "\n"
            index = self._text.find(echo)
            if index < 0:
                break
            self._text = self._text[:index] + self._text[index + len(echo) :]
            self._echoes.popleft()
        *complete, self._text = self._text.split("\n")
        if not chunk and self._text:
            complete.append(self._text)
            self._text = ""
        for line in complete:
            self._on_line(line.replace(">> ", "").rstrip("\r"))
        if not chunk:
            self._eof = True
            for channel in self._listeners:
                channel.close()
        self._changed.set()
        self._changed = trio.Event()

    def _on_line(self, line: str) -> None:
        assert self._child is not None
        self._child.tail.append(line[:300])
        self.lines.append(line)
        if (banner := _BANNER.search(line)) is not None and not self.node_id:
            self.node_id = bytes.fromhex(banner.group(1))
            self.port = int(banner.group(2))
        if (value := parse_value_line(line)) is not None:
            if self._block is not None and self._block_left > 0:
                self._block_left -= 1
                kind, expired = self._block
                if kind == "get":
                    self.records.append(("get", value))
                else:
                    self.records.append(("listen", value, expired))
                    event = {**value, "expired": expired}
                    for channel in self._listeners:
                        channel.send_nowait(event)
            return
        if (found := _GET_FOUND.search(line)) is not None:
            self._block, self._block_left = ("get", False), int(found.group(1))
        elif (found := _LISTEN_FOUND.search(line)) is not None:
            self._block, self._block_left = ("listen", bool(found.group(2))), int(found.group(1))
        elif (done := _GET_DONE.search(line)) is not None:
            self.records.append(("get_done", done.group(1) == "completed"))
        elif (done := _PUT_DONE.search(line)) is not None:
            self.records.append(("put_done", done.group(1) == "success", int(done.group(2), 16)))
        elif (listening := _LISTENING.search(line)) is not None:
            self.records.append(("listening", int(listening.group(1))))

    async def _wait_for(self, check: Callable[[], T | None], what: str, timeout: float) -> T:
        assert self._child is not None
        try:
            with trio.fail_after(timeout):
                while True:
                    result = check()
                    if result is not None:
                        return result
                    if self._eof:
                        raise self._child.error(f"{what}: dhtnode exited")
                    await self._changed.wait()
        except trio.TooSlowError:
            raise self._child.error(f"{what}: no answer within {timeout} s") from None

    def _find_line(self, pattern: re.Pattern[str], start: int, count: int = 1) -> int | None:
        seen = 0
        for index in range(start, len(self.lines)):
            if pattern.search(self.lines[index]):
                seen += 1
                if seen == count:
                    return index
        return None

    def _find_record(self, kind: str, start: int) -> int | None:
        for index in range(start, len(self.records)):
            if self.records[index][0] == kind:
                return index
        return None

    async def _send(self, text: str) -> None:
        assert self._child is not None
        if "\n" in text:
            raise ValueError("one command per call")
        self._echoes.append(text)
        await self._child.send_line(text)

    # -- commands -------------------------------------------------------------------------

    async def command(
        self,
        text: str,
        *,
        until: str | re.Pattern[str] | None = None,
        count: int = 1,
        timeout: float = CALL_TIMEOUT,
    ) -> list[str]:
        """Run one prompt command and return its output lines.

        Without ``until`` the command is taken as synchronous: a sync marker follows it and the
        lines up to the marker are returned. For asynchronous commands (``g``, ``p``, ``l``,
        ``ll``) pass ``until``, a regex searched in each line: output is returned up to and
        including the ``count``-th matching line.
        """
        async with self._command_lock:
            start = len(self.lines)
            await self._send(text)
            if until is None:
                self._sync_count += 1
                marker = f"__sync{self._sync_count}"
                await self._send(marker)
                pattern = re.compile(re.escape(f"Unknown command: {marker}"))
                end = await self._wait_for(lambda: self._find_line(pattern, start), text, timeout)
                output = self.lines[start:end]
            else:
                pattern = re.compile(until) if isinstance(until, str) else until
                end = await self._wait_for(lambda: self._find_line(pattern, start, count), text, timeout)
                output = self.lines[start : end + 1]
        return [line for line in output if not line.startswith(" (type 'h' or 'help'")]

    async def get(
        self, key: bytes | str, where: str = "", *, timeout: float = CALL_TIMEOUT
    ) -> list[dict[str, Any]]:
        """``g KEY [WHERE]``: values as parsed by :func:`parse_value_line`."""
        async with self._command_lock:
            start = len(self.records)
            await self._send(f"g {_key_text(key)} {where}".rstrip())
            end = await self._wait_for(lambda: self._find_record("get_done", start), "g", timeout)
            return [record[1] for record in self.records[start:end] if record[0] == "get"]

    async def put(self, key: bytes | str, word: str, *, timeout: float = CALL_TIMEOUT) -> bool:
        """``p KEY WORD``: put a one-word text/plain value; True on success."""
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"dhtnode's p command stores one word, got {word!r}")
        async with self._command_lock:
            start = len(self.records)
            await self._send(f"p {_key_text(key)} {word}")
            end = await self._wait_for(lambda: self._find_record("put_done", start), "p", timeout)
            return bool(self.records[end][1])

    @asynccontextmanager
    async def listen(
        self, key: bytes | str, *, timeout: float = CALL_TIMEOUT
    ) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """``l KEY``: yields value events ``{"id", "data", "size", "utype", "text", "expired"}``.

        dhtnode does not say which listen an event belongs to: every open listen sees every
        event, so keep one listen at a time. ``cl KEY TOKEN`` is sent on exit.
        """
        text_key = _key_text(key)
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._listeners.append(send)
        token: int | None = None
        try:
            async with self._command_lock:
                start = len(self.records)
                await self._send(f"l {text_key}")
                index = await self._wait_for(lambda: self._find_record("listening", start), "l", timeout)
                token = int(self.records[index][1])
            async with receive:
                yield receive
        finally:
            self._listeners.remove(send)
            send.close()
            if token is not None and not self._eof:
                # Shielded so a cancelled caller still cancels; an error here must not mask theirs.
                with trio.CancelScope(shield=True), contextlib.suppress(PeerError):
                    await self.command(f"cl {text_key} {token}", timeout=timeout)

    async def bootstrap(self, host: str, port: int) -> None:
        """``b HOST:PORT``: ping that node (no output)."""
        await self.command(f"b {_host_port(host, port)}")

    async def node_info(self, *, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        """``ll``: ``{"node_id", "port", "ongoing", "values", "ipv4": {...}, "ipv6": {...}}``.

        Each family has ``good``, ``dubious``, ``incoming``, ``searches``, ``cached``.
        """
        for _ in range(3):  # the prompt may interleave the end of an earlier command's output: ask again
            lines = await self.command(
                "ll", until=r"\d+ searches, \d+ total cached nodes", count=2, timeout=timeout
            )
            if any(_BANNER.search(line) for line in lines):
                break
        info: dict[str, Any] = {}
        family = ""
        for line in lines:
            if (banner := _BANNER.search(line)) is not None:
                info["node_id"], info["port"] = banner.group(1), int(banner.group(2))
            elif (ongoing := re.search(r"(\d+) ongoing operations", line)) is not None:
                info["ongoing"] = int(ongoing.group(1))
            elif (storage := re.search(r"Storage has (\d+) values", line)) is not None:
                info["values"] = int(storage.group(1))
            elif (stats := re.search(r"IPv([46]) stats:", line)) is not None:
                family = f"ipv{stats.group(1)}"
                info[family] = {}
            elif family and (known := _KNOWN_NODES.search(line)) is not None:
                info[family].update(good=int(known[1]), dubious=int(known[2]), incoming=int(known[3]))
            elif family and (searches := re.search(r"(\d+) searches, (\d+) total cached", line)) is not None:
                info[family].update(searches=int(searches[1]), cached=int(searches[2]))
        return info

    async def _stop(self, child: Child) -> None:
        """``x``, then EOF; killed after 2 s, as dhtnode's shutdown sometimes never completes."""
        with contextlib.suppress(PeerError):
            await self._send("x")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await child.close_stdin()
        if not await child.wait_exit(2.0):
            child.process.kill()


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@asynccontextmanager
async def open_dhtnode_prompt(
    args: Sequence[str], *, start_timeout: float = 15.0, program: Sequence[str] | None = None
) -> AsyncIterator[DhtnodePrompt]:
    """Run ``dhtnode ARGS`` in interactive mode and wait for its banner; ``program``: instead of dhtnode,
    another command that speaks its prompt (``trio-dht --interactive``)."""
    prompt = DhtnodePrompt(" ".join([*(program or ["dhtnode"]), *args]))
    if program is None:
        path = dhtnode_path()
        if path is None:
            raise PeerUnavailable("dhtnode is not installed")
        program = [path]
    async with open_child(
        [*program, *args],
        name=prompt.name,
        on_stdout=prompt._on_stdout,
        stop=prompt._stop,
        merge_stderr=True,
    ) as child:
        prompt._child = child
        await prompt._wait_for(lambda: prompt.port if prompt.node_id else None, "banner", start_timeout)
        yield prompt


@asynccontextmanager
async def open_dhtnode_proxy_client(
    url: str, devicekey: str | None = None, *, extra_args: Sequence[str] = (), start_timeout: float = 15.0
) -> AsyncIterator[DhtnodePrompt]:
    """Run ``dhtnode --proxyclient URL [--devicekey TOKEN]``: OpenDHT 2.4.12's C++ proxy client.

    Drive it with :meth:`DhtnodePrompt.get`/``put``/``listen``/``command``. Its push
    ``client_id`` is the fixed string ``dhtnode``.
    """
    args = ["--proxyclient", url]
    if devicekey is not None:
        args += ["--devicekey", devicekey]
    async with open_dhtnode_prompt([*args, *extra_args], start_timeout=start_timeout) as prompt:
        yield prompt


class _JsonLines:
    """Async iterator over the JSON values of a streaming proxy response."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    def __aiter__(self) -> _JsonLines:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            line = (await self._lines.__anext__()).strip()
            if not line:
                continue
            wire = json.loads(line)
            if wire:
                event = _json_value(wire)
                event.setdefault("expired", False)
                return event


class DhtnodePeer:
    """A dhtnode DHT peer: data through its proxy server, the rest through its prompt."""

    def __init__(self, prompt: DhtnodePrompt, client: httpx.AsyncClient, proxy_port: int) -> None:
        self.prompt = prompt
        self.host = "127.0.0.1"
        self.port = prompt.port
        self.proxy_port = proxy_port
        self.proxy_url = f"http://127.0.0.1:{proxy_port}"
        self._client = client

    @property
    def address(self) -> tuple[str, int]:
        """(host, UDP port) to bootstrap other nodes from."""
        return (self.host, self.port)

    def _error(self, what: str) -> PeerError:
        assert self.prompt._child is not None
        return self.prompt._child.error(what)

    async def _request(self, method: str, path: str, timeout: float, **kwargs: Any) -> httpx.Response:
        try:
            with trio.fail_after(timeout):
                return await self._client.request(method, path, **kwargs)
        except trio.TooSlowError:
            raise self._error(f"{method} {path}: no answer within {timeout} s") from None
        except httpx.HTTPError as exc:
            raise self._error(f"{method} {path}: {exc!r}") from exc

    async def command(self, text: str, **kwargs: Any) -> list[str]:
        """A prompt command; see :meth:`DhtnodePrompt.command`."""
        return await self.prompt.command(text, **kwargs)

    async def bootstrap(self, host: str, port: int) -> None:
        """Ping ``host:port`` (prompt ``b``)."""
        await self.prompt.bootstrap(host, port)

    async def put(self, key: bytes, data: bytes, **options: Any) -> bool:
        """Put a value through the proxy; True when the DHT put succeeded (HTTP 200, not 502). ``options``
        as :meth:`put_value`."""
        return bool((await self.put_value(key, data, **options))["ok"])

    async def put_value(
        self,
        key: bytes,
        data: bytes,
        *,
        value_type: int = 0,
        utype: str = "",
        value_id: int | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> dict[str, Any]:
        """Like :meth:`put`, returning ``{"ok", "id"}`` (``id`` is None on a 502 without one given)."""
        body: dict[str, Any] = {"data": base64.b64encode(data).decode(), "type": value_type}
        if utype:
            body["utype"] = utype
        if value_id is not None:
            body["id"] = str(value_id)
        response = await self._request("POST", f"/key/{_key_text(key)}", timeout, json=body)
        if response.status_code == 200:
            return {"ok": True, "id": int(response.json()["id"])}
        if response.status_code == 502:
            return {"ok": False, "id": value_id}
        raise self._error(f"POST /key: HTTP {response.status_code} {response.text[:200]}")

    async def get(
        self, key: bytes, *, value_type: int | None = None, timeout: float = CALL_TIMEOUT
    ) -> list[dict[str, Any]]:
        """Values at ``key`` as ``{"id", "data", "type", "utype"}`` (``value_type`` filters locally)."""
        response = await self._request("GET", f"/key/{_key_text(key)}", timeout)
        if response.status_code != 200:
            raise self._error(f"GET /key: HTTP {response.status_code} {response.text[:200]}")
        values = [_json_value(json.loads(line)) for line in response.text.splitlines() if line.strip()]
        return [value for value in values if value_type is None or value["type"] == value_type]

    @asynccontextmanager
    async def listen(self, key: bytes, *, timeout: float = CALL_TIMEOUT) -> AsyncIterator[_JsonLines]:
        """``GET /key/HEX/listen``: yields events ``{"id", "data", "type", "utype", "expired"}``."""
        path = f"/key/{_key_text(key)}/listen"
        async with contextlib.AsyncExitStack() as stack:
            try:
                with trio.fail_after(timeout):
                    response = await stack.enter_async_context(
                        self._client.stream("GET", path, timeout=httpx.Timeout(timeout, read=None))
                    )
            except trio.TooSlowError:
                raise self._error(f"GET {path}: no answer within {timeout} s") from None
            if response.status_code != 200:
                raise self._error(f"GET {path}: HTTP {response.status_code}")
            yield _JsonLines(response)

    async def info(self, *, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        """``GET /node/info``: ``{"node_id", "ipv4": {"good", "dubious", "incoming"}, "ipv6", ...}``.

        The proxy caches this: it is refreshed at start, 3 s later, then every 2 minutes. For
        live counts use :meth:`DhtnodePrompt.node_info` (``ll``), as :meth:`good_nodes` does.
        """
        response = await self._request("GET", "/node/info", timeout)
        return response.json()

    async def node_id(self) -> bytes:
        """The node's 20-byte id (from its banner)."""
        return self.prompt.node_id

    async def good_nodes(self) -> int:
        """Number of good nodes in the routing tables (both families), live (prompt ``ll``)."""
        info = await self.prompt.node_info()
        return int(info["ipv4"]["good"]) + int(info["ipv6"]["good"])

    async def wait_for_nodes(self, count: int = 1, *, timeout: float = 15.0) -> None:
        """Wait until at least ``count`` good nodes are known (polling every 50 ms)."""
        try:
            with trio.fail_after(timeout):
                while await self.good_nodes() < count:
                    await trio.sleep(0.05)
        except trio.TooSlowError:
            raise self._error(f"fewer than {count} good node(s) after {timeout} s") from None


@asynccontextmanager
async def open_dhtnode_peer(
    port: int | None = None,
    *,
    bootstrap: tuple[str, int] | None = None,
    proxy_port: int | None = None,
    network: int = 0,
    rate_limit: bool = True,
    extra_args: Sequence[str] = (),
    start_timeout: float = 15.0,
) -> AsyncIterator[DhtnodePeer]:
    """Run a dhtnode DHT peer for the length of the block.

    ``port`` None or 0: a random UDP port (see ``peer.port``). ``proxy_port`` None: a free
    loopback TCP port is chosen for the proxy server (retried if it is taken meanwhile).
    ``rate_limit=False`` passes ``-U``. ``peer.proxy_url`` is always set.
    """
    base_args = ["-p", str(port or 0), "--proxy-addr", "127.0.0.1"]
    if network:
        base_args += ["-n", str(network)]
    if bootstrap is not None:
        base_args += ["-b", _host_port(*bootstrap)]
    if not rate_limit:
        base_args.append("-U")
    async with contextlib.AsyncExitStack() as stack:
        for attempt in range(3):
            chosen_proxy_port = proxy_port if proxy_port is not None else free_port("tcp")
            args = [*base_args, "--proxyserver", str(chosen_proxy_port), *extra_args]
            try:
                prompt = await stack.enter_async_context(
                    open_dhtnode_prompt(args, start_timeout=start_timeout)
                )
                break
            except PeerError as exc:
                if proxy_port is not None or attempt == 2 or "Address already in use" not in str(exc):
                    raise
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{chosen_proxy_port}", trust_env=False)
        )
        peer = DhtnodePeer(prompt, client, chosen_proxy_port)
        await peer.info(timeout=start_timeout)  # the proxy answers
        yield peer
