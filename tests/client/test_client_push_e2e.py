"""Push mode end to end on 127.0.0.1: the client SUBSCRIBEs to our proxy, whose push service (SUBSCRIBE /
UNSUBSCRIBE served here by a small test blueprint until trio_dht/push has its routes) sends pushes to a
recording gateway; the test hands each push's data to the client as a device would, in both dialects."""

from __future__ import annotations

import math
from functools import partial

import pytest
import trio
from quart import Blueprint, Response, request

from trio_dht.api import ValueEvent
from trio_dht.client import PushResult, open_proxy_client
from trio_dht.infohash import InfoHash
from trio_dht.proxy import ProxyConfig, serve_proxy
from trio_dht.push.dispatcher import DeliveryQueue, Dispatcher
from trio_dht.push.gateway import Outcome
from trio_dht.push.payloads import Platform, Push
from trio_dht.push.service import PushService
from trio_dht.rest.value_json import value_line
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import Value

BOUND = 5.0
KEY = InfoHash.get("device-inbox")


class ChannelGateway:
    """A push gateway whose deliveries the test reads from a channel."""

    name = "channel"
    max_batch = 100

    def __init__(self) -> None:
        self.send_channel, self.receive_channel = trio.open_memory_channel[Push](math.inf)

    def lane(self, push: Push) -> int:
        return 0

    async def send(self, pushes: list[Push]) -> list[Outcome]:
        for push in pushes:
            self.send_channel.send_nowait(push)
        return [Outcome.DELIVERED for _ in pushes]

    async def next(self) -> Push:
        with trio.fail_after(BOUND):
            return await self.receive_channel.receive()

    async def none(self, wait: float = 0.3) -> None:
        with trio.move_on_after(wait):
            push = await self.receive_channel.receive()
            raise AssertionError(f"unexpected push {push}")


def push_blueprint(service: PushService) -> Blueprint:
    bp = Blueprint("test_push", __name__)

    @bp.route("/key/<hash:key>", methods=["SUBSCRIBE"], provide_automatic_options=False)
    @bp.route("/<hash:key>", methods=["SUBSCRIBE"], provide_automatic_options=False)
    async def subscribe(key: InfoHash) -> Response:
        reply = await service.subscribe(key, await request.get_data())
        body = reply.body + b"".join(value_line(v) for v in reply.values or ())
        return Response(body, status=reply.status, content_type="application/json")

    @bp.route("/key/<hash:key>", methods=["UNSUBSCRIBE"], provide_automatic_options=False)
    @bp.route("/<hash:key>", methods=["UNSUBSCRIBE"], provide_automatic_options=False)
    async def unsubscribe(key: InfoHash) -> Response:
        reply = service.unsubscribe(key, await request.get_data())
        return Response(reply.body, status=reply.status, content_type="application/json")

    return bp


@pytest.fixture
async def stack(nursery: trio.Nursery) -> tuple[str, MemoryDht, PushService, ChannelGateway]:
    dht = MemoryDht()
    gateway = ChannelGateway()
    dispatcher = Dispatcher({p: gateway for p in Platform}, queue=DeliveryQueue(batch_window=0.01))
    service = PushService(dht, dispatcher)
    await nursery.start(dispatcher.run)
    await nursery.start(service.run)
    config = ProxyConfig(host="127.0.0.1", port=0, graceful_timeout=0.5)
    serve = partial(serve_proxy, dht, config, blueprints=[push_blueprint(service)])
    (url,) = await nursery.start(serve)
    return url, dht, service, gateway


async def next_event(events) -> ValueEvent:
    with trio.fail_after(BOUND):
        return await events.__anext__()


async def no_event(events, wait: float = 0.3) -> None:
    with trio.move_on_after(wait):
        event = await events.__anext__()
        raise AssertionError(f"unexpected event {event}")


def as_device_gets_it(push: Push) -> dict[str, str]:
    """FCM hands ``data`` to the app with every value a string."""
    return {name: str(value) for name, value in push.data.items()}


async def test_current_dialect(stack) -> None:
    url, dht, service, gateway = stack
    await dht.put(KEY, Value(b"first", id=1))
    async with open_proxy_client(
        url, push_token="fcm-token", client_id="acct", session_id="S1", resubscribe_guard=0.0
    ) as app:
        async with app.listen(KEY) as events:
            assert (await next_event(events)).value.id == 1  # SUBSCRIBE, then GET for current values
            hello = await gateway.next()  # the proxy pushes at once for values already there
            assert hello.token == "fcm-token" and hello.data["s"] == "S1" and hello.data["to"] == "acct"
            assert await app.push_notification_received(as_device_gets_it(hello)) is PushResult.VALUES
            await no_event(events)
            await dht.put(KEY, Value(b"second", id=2))
            push = await gateway.next()
            assert await app.push_notification_received(as_device_gets_it(push)) is PushResult.VALUES
            assert (await next_event(events)).value.data == b"second"
            await no_event(events)

            # another process (an iOS notification extension) on the same token and client id takes over
            async with (
                open_proxy_client(url, push_token="fcm-token", client_id="acct", session_id="EXT") as ext,
                ext.listen(KEY) as ext_events,
            ):
                assert {(await next_event(ext_events)).value.id for _ in range(2)} == {1, 2}
                await dht.put(KEY, Value(b"call", id=3))
                stolen = await gateway.next()
                assert stolen.data["s"] == "EXT"
                result = await app.push_notification_received(as_device_gets_it(stolen))
                assert result is PushResult.IGNORED_WRONG_SESSION
                assert (await next_event(events)).value.data == b"call"  # fetched, not dropped
                await dht.put(KEY, Value(b"next", id=4))
                assert (await gateway.next()).data["s"] == "S1"  # the app re-subscribed: pushes come back
                assert len(service.book) == 1
        # the listen ended: UNSUBSCRIBEd
        with trio.fail_after(BOUND):
            while len(service.book):
                await trio.sleep(0.01)


async def test_token_change_moves_the_subscription(stack) -> None:
    url, dht, service, gateway = stack
    async with open_proxy_client(url, push_token="old", client_id="acct") as app, app.listen(KEY) as events:
        await app.set_push_token("new")
        assert service.push_listeners_count == 1
        await dht.put(KEY, Value(b"v", id=5))
        push = await gateway.next()
        assert push.token == "new"
        assert await app.push_notification_received(push.data) is PushResult.VALUES
        assert (await next_event(events)).value.id == 5
        await gateway.none()


async def test_seed_dialect(stack) -> None:
    url, dht, service, gateway = stack
    async with (
        open_proxy_client(url, push_token="dev", client_id="cb", dialect="seed") as app,
        app.listen(KEY) as events,
    ):
        sub_token = app.book.watches[KEY].seed_token
        assert isinstance(sub_token, int)
        await dht.put(KEY, Value(b"seed value", id=8))
        push = await gateway.next()
        assert push.data == {"callback_id": "cb", "token": sub_token}
        assert await app.push_notification_received(as_device_gets_it(push)) is PushResult.VALUES
        assert (await next_event(events)).value.data == b"seed value"
        timeout = {"token": str(sub_token), "callback_id": "cb", "timeout": KEY.hex()}
        assert await app.push_notification_received(timeout) is PushResult.LISTEN_REFRESH
        assert service.stats["refreshed"] == 1
    assert len(service.book) == 0  # UNSUBSCRIBE {key, token, callback_id}
