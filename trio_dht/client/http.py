"""The proxy client's HTTP (Trio shell): one ``httpx.AsyncClient``, every request bounded as a whole, every
failure a :class:`ProxyError`.

A request, its whole reply included, takes at most ``timeout`` seconds: a proxy that never answers is a
:class:`ProxyTimeout`, never a hang. A LISTEN stream is bounded until its headers arrive; after that TCP
keepalive (idle 30 s, probes every 1 s, 10 probes, as OpenDHT's client sets it) finds a dead connection.
A failure at the connection level calls ``check_health`` (the client then checks the proxy at once).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import httpx
import trio

from trio_dht.client.ndjson import LineSplitter, LineTooLong
from trio_dht.infohash import InfoHash

DEFAULT_TIMEOUT = 30.0
"""Seconds any one request may take (a put waits for the DHT announce, which can take ~10 s)."""
USER_AGENT = "trio-dht proxy client"


class ProxyError(Exception):
    """A request to the proxy failed: unreachable, cut off, or an unexpected reply."""


class ProxyTimeout(ProxyError):
    """The proxy did not answer within the client's timeout."""


class ProxyHTTPError(ProxyError):
    """The proxy answered with an error status."""

    def __init__(self, message: str, status: int, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def normalize_url(url: str) -> str:
    """``http://host:port`` (``host:port`` alone is taken as plain HTTP, as OpenDHT), no trailing slash."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def key_path(key: InfoHash, suffix: str = "") -> str:
    """The path of ``key`` (``/key/{hex}``), then ``suffix``."""
    return f"/key/{key.hex()}{suffix}"


def _keepalive_options() -> list[tuple[int, int, int]]:
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 10)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


def new_http_client(
    timeout: float, *, verify: Any = True, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The client's one ``httpx.AsyncClient`` (``transport``: another transport, e.g. a mock in tests)."""
    if transport is None:
        transport = httpx.AsyncHTTPTransport(
            verify=verify,
            socket_options=_keepalive_options(),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=8),
        )
    headers = {"User-Agent": USER_AGENT, "Accept": "*/*", "Content-Type": "application/json"}
    return httpx.AsyncClient(transport=transport, headers=headers, timeout=httpx.Timeout(timeout))


def check_status(response: httpx.Response, what: str, expected: int = 200) -> None:
    """Raise :class:`ProxyHTTPError` unless ``response`` has status ``expected``."""
    if response.status_code != expected:
        text = response.content[:200].decode("utf-8", "replace").strip()
        raise ProxyHTTPError(f"{what}: HTTP {response.status_code} {text}".rstrip(), response.status_code,
                             response.content)  # fmt: skip


class ProxyHttp:
    """Requests to the proxy at ``base_url``, each bounded by ``timeout`` seconds."""

    def __init__(
        self, client: httpx.AsyncClient, base_url: str, timeout: float, check_health: Callable[[], None]
    ) -> None:
        self._client = client
        self.base_url = base_url
        self.timeout = timeout
        self.check_health = check_health
        """Asks the client to check the proxy's health soon."""
        self.closed = False
        """Set when the proxy client closes: later requests fail at once."""

    def failed(self, what: str, exc: BaseException) -> ProxyError:
        """The error for a failure at the connection level (a health check is asked for)."""
        self.check_health()
        if isinstance(exc, trio.TooSlowError | httpx.TimeoutException):
            return ProxyTimeout(f"{what}: no answer from {self.base_url} within {self.timeout:g} s")
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return ProxyError(f"{what}: {detail}")

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise ProxyError(f"{what}: the proxy client is closed")

    async def request(self, method: str, path: str, body: bytes | None = None) -> httpx.Response:
        """One request, its whole reply read, bounded by :attr:`timeout`."""
        what = f"{method} {path}"
        self._check_open(what)
        try:
            with trio.fail_after(self.timeout):
                return await self._client.request(method, self.base_url + path, content=body)
        except (trio.TooSlowError, httpx.HTTPError) as exc:
            raise self.failed(what, exc) from None
        except RuntimeError as exc:  # httpx: "Cannot send a request, as the client has been closed."
            raise ProxyError(f"{what}: {exc}") from None

    async def get_lines(self, path: str, on_lines: Callable[[list[bytes]], None]) -> None:
        """``GET path``, its NDJSON body handed to ``on_lines`` as lines complete; bounded by :attr:`timeout`
        as a whole."""
        what = f"GET {path}"
        self._check_open(what)
        splitter = LineSplitter()
        try:
            with trio.fail_after(self.timeout):
                async with self._client.stream("GET", self.base_url + path) as response:
                    check_status(response, what)
                    async for chunk in response.aiter_bytes():
                        on_lines(splitter.feed(chunk))
                    on_lines(splitter.end())
        except (trio.TooSlowError, httpx.HTTPError) as exc:
            raise self.failed(what, exc) from None
        except LineTooLong as exc:
            raise ProxyError(f"{what}: {exc}") from None

    async def open_stream(self, path: str) -> httpx.Response:
        """``GET path`` until its headers (bounded by :attr:`timeout`), its body left to read; a reply other
        than 200 is read (bounded too), closed and raised as :class:`ProxyHTTPError`. The caller closes the
        response."""
        what = f"GET {path}"
        request = self._client.build_request(
            "GET", self.base_url + path, timeout=httpx.Timeout(self.timeout, read=None)
        )
        try:
            with trio.fail_after(self.timeout):
                response = await self._client.send(request, stream=True)
        except (trio.TooSlowError, httpx.HTTPError) as exc:
            raise self.failed(what, exc) from None
        if response.status_code != 200:
            try:
                with trio.move_on_after(self.timeout):
                    await response.aread()
                check_status(response, what)
            except httpx.HTTPError as exc:
                raise self.failed(what, exc) from None
            finally:
                await close_response(response)
        return response


async def close_response(response: httpx.Response) -> None:
    """Close a streamed response, even in a cancelled scope (at most 1 s)."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        await response.aclose()
