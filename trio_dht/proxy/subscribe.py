"""``SUBSCRIBE`` and ``UNSUBSCRIBE`` on ``/key/{hash}`` and ``/{hash}``: the push routes, a Quart blueprint.

Register it with ``create_app(dht, config, blueprints=[subscribe_blueprint(service)], push=hooks)`` (or the
same arguments to :func:`~trio_dht.proxy.server.serve_proxy`). The logic is the
:class:`~trio_dht.push.service.PushService`'s; a route only reads the body and writes the
:class:`~trio_dht.push.service.PushReply`: a complete JSON body, or a chunked one (the body, then one value
JSON per line, as a GET streams them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from quart import Blueprint, Response, request

from trio_dht.infohash import InfoHash
from trio_dht.proxy.handlers import Reply
from trio_dht.proxy.routes import proxy_state, streaming_response, to_response
from trio_dht.proxy.value_json import value_line
from trio_dht.push.service import PushReply, PushService


async def _chunks(reply: PushReply) -> AsyncIterator[bytes]:
    if reply.body:
        yield reply.body
    for value in reply.values or ():
        yield value_line(value)


def push_response(reply: PushReply) -> Response:
    """The HTTP response for a :class:`PushReply` (``Content-Type: application/json`` and the proxy's
    headers)."""
    if reply.chunked:
        return streaming_response(_chunks(reply))
    return to_response(Reply(reply.status, reply.body))


def subscribe_blueprint(service: PushService) -> Blueprint:
    """The SUBSCRIBE / UNSUBSCRIBE routes of ``service``."""
    bp = Blueprint("push", __name__)

    @bp.route("/key/<hash:key>", methods=["SUBSCRIBE"], provide_automatic_options=False)
    @bp.route("/<hash:key>", methods=["SUBSCRIBE"], provide_automatic_options=False)
    async def subscribe(key: InfoHash) -> Response:
        proxy_state().count_request()
        body = await request.get_data(cache=False)
        return push_response(await service.subscribe(key, body))

    @bp.route("/key/<hash:key>", methods=["UNSUBSCRIBE"], provide_automatic_options=False)
    @bp.route("/<hash:key>", methods=["UNSUBSCRIBE"], provide_automatic_options=False)
    async def unsubscribe(key: InfoHash) -> Response:
        proxy_state().count_request()
        body = await request.get_data(cache=False)
        return push_response(service.unsubscribe(key, body))

    return bp
