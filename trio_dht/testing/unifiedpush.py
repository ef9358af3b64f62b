"""A UnifiedPush / Web Push endpoint double: a real loopback server that decrypts ``aes128gcm`` messages.

Usage::

    async with open_unifiedpush_double() as server:
        endpoint = server.endpoint()                  # a subscription: URL, keys, "<p256dh>|<auth>" topic
        ... subscribe with key=endpoint.url, topic=endpoint.topic, platform="unifiedpush" ...
        endpoint.script(429, headers={"Retry-After": "30"})
        assert json.loads(endpoint.messages[0]) == {...}

Each endpoint is ``/up/<name>`` with its own P-256 key pair and auth secret. A ``POST`` is checked as a push
service checks it (RFC 8030/8291, UnifiedPush AND_3): ``TTL`` required (400 otherwise); a body over 4096 bytes
is 413; ``Content-Encoding: aes128gcm`` bodies are decrypted with the endpoint's keys (400 if that fails);
plain bodies are refused with 400 when ``require_encryption``. Accepted messages are recorded (decrypted) in
:attr:`WebPushEndpoint.messages` and answered ``201 Created`` with a ``Location``. Scripted replies (201, 404,
410, 413, 429, 507, a 3xx redirect...) replace the next answers of one endpoint; an unknown endpoint is 404. A
scripted reply may also trickle (``byte_interval``: one byte per that many seconds) or be huge (``repeat``:
the body that many times over, streamed), as a hostile endpoint would answer.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from trio_dht.push import webpush_crypto
from trio_dht.testing.gorush import RecordedRequest, Reply, open_loopback_server

MAX_MESSAGE = 4096


@dataclass(eq=False)
class WebPushEndpoint:
    """One push subscription on the double."""

    name: str
    url: str
    private_key: bytes
    """The subscription's P-256 private key (32-byte scalar)."""
    auth: bytes
    messages: list[bytes] = field(default_factory=list)
    """Accepted message bodies, decrypted."""
    requests: list[RecordedRequest] = field(default_factory=list)
    """Every request to this endpoint, as received."""
    replies: deque[Reply] = field(default_factory=deque)

    @property
    def p256dh(self) -> bytes:
        return webpush_crypto.public_bytes(self.private_key)

    @property
    def topic(self) -> str:
        """The subscription keys as OpenDHT clients send them in ``topic``: ``"<p256dh>|<auth>"``."""
        return f"{webpush_crypto.b64url(self.p256dh)}|{webpush_crypto.b64url(self.auth)}"

    def script(
        self,
        status: int,
        headers: dict[str, str] | None = None,
        times: int = 1,
        *,
        body: bytes = b"",
        repeat: int = 1,
        byte_interval: float = 0.0,
    ) -> None:
        """The next ``times`` valid pushes to this endpoint get this reply (and are not recorded); ``body``,
        ``repeat`` and ``byte_interval`` as :class:`~trio_dht.testing.gorush.Reply`."""
        self.replies.extend([Reply(status, body, headers or {}, repeat, byte_interval)] * times)


class UnifiedPushDouble:
    """A Web Push service with any number of endpoints (see the module docstring)."""

    def __init__(self, *, require_encryption: bool = False) -> None:
        self.url = ""
        self.require_encryption = require_encryption
        self.endpoints: dict[str, WebPushEndpoint] = {}
        self.requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)

    def endpoint(self, name: str | None = None) -> WebPushEndpoint:
        """A new endpoint (subscription) with fresh keys."""
        name = name or f"ep{next(self._ids)}"
        ep = WebPushEndpoint(
            name=name,
            url=f"{self.url}/up/{name}",
            private_key=webpush_crypto.generate_private_key(),
            auth=os.urandom(16),
        )
        self.endpoints[name] = ep
        return ep

    async def handle(self, request: RecordedRequest) -> Reply:
        self.requests.append(request)
        path = request.path.split("?", 1)[0]
        ep = self.endpoints.get(path[len("/up/") :]) if path.startswith("/up/") else None
        if ep is None:
            return Reply(404)
        ep.requests.append(request)
        if request.method != "POST":
            return Reply(405)
        ttl = request.headers.get("ttl", "")
        if not ttl.isdecimal():
            return Reply(400, b"missing or bad TTL header")
        if len(request.body) > MAX_MESSAGE:
            return Reply(413)
        if request.headers.get("content-encoding", "").lower() == "aes128gcm":
            try:
                message = webpush_crypto.decrypt(request.body, ep.private_key, ep.auth)
            except webpush_crypto.WebPushCryptoError as exc:
                return Reply(400, f"cannot decrypt: {exc}".encode())
        elif self.require_encryption or request.headers.get("content-encoding"):
            return Reply(400, b"messages must be aes128gcm-encrypted")
        else:
            message = request.body
        if ep.replies:
            return ep.replies.popleft()
        ep.messages.append(message)
        return Reply(201, headers={"Location": f"/m/{next(self._ids)}", "TTL": ttl})


@asynccontextmanager
async def open_unifiedpush_double(*, require_encryption: bool = False) -> AsyncIterator[UnifiedPushDouble]:
    """Run a :class:`UnifiedPushDouble` on loopback for the duration of the block."""
    double = UnifiedPushDouble(require_encryption=require_encryption)
    async with open_loopback_server(double.handle) as url:
        double.url = url
        yield double
