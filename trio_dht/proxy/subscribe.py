"""``SUBSCRIBE`` and ``UNSUBSCRIBE`` on ``/key/{hash}`` and ``/{hash}``: the push routes, a Quart blueprint.

Register it with the push hooks that serve it: ``create_app(dht, config, blueprints=[subscribe_blueprint()],
push=hooks)`` (or the same arguments to :func:`~trio_dht.proxy.server.serve_proxy`). The logic is
:func:`trio_dht.proxy.handlers.subscribe` / :func:`~trio_dht.proxy.handlers.unsubscribe`, the same functions
the plain-HTTP front end calls (:mod:`~trio_dht.proxy.frontend`, which serves these methods itself when the
app has push hooks); Quart serves them on TLS, with ``fast_path`` off and on handed-over connections. A route
only reads the body and writes the :class:`~trio_dht.push.service.PushReply`: a complete JSON body, or a
chunked one (:func:`~trio_dht.proxy.handlers.push_reply_chunks`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from quart import Blueprint, Response, request

from trio_dht.infohash import InfoHash
from trio_dht.proxy import handlers
from trio_dht.proxy.handlers import Reply
from trio_dht.proxy.routes import proxy_state, streaming_response, to_response

if TYPE_CHECKING:
    from trio_dht.push.service import PushReply


async def _chunks(reply: PushReply) -> AsyncIterator[bytes]:
    for data in handlers.push_reply_chunks(reply):
        yield data


def push_response(reply: PushReply) -> Response:
    """The HTTP response for a :class:`PushReply` (``Content-Type: application/json`` and the proxy's
    headers)."""
    if reply.chunked:
        return streaming_response(_chunks(reply))
    return to_response(Reply(reply.status, reply.body))


def subscribe_blueprint() -> Blueprint:
    """The SUBSCRIBE / UNSUBSCRIBE routes, served by the app's push hooks."""
    bp = Blueprint("push", __name__)

    @bp.route("/key/<hash:key>", methods=["SUBSCRIBE"], provide_automatic_options=False)
    @bp.route("/<hash:key>", methods=["SUBSCRIBE"], provide_automatic_options=False)
    async def subscribe(key: InfoHash) -> Response:
        body = await request.get_data(cache=False)
        return push_response(await handlers.subscribe(proxy_state(), key, body, request.remote_addr))

    @bp.route("/key/<hash:key>", methods=["UNSUBSCRIBE"], provide_automatic_options=False)
    @bp.route("/<hash:key>", methods=["UNSUBSCRIBE"], provide_automatic_options=False)
    async def unsubscribe(key: InfoHash) -> Response:
        body = await request.get_data(cache=False)
        return push_response(handlers.unsubscribe(proxy_state(), key, body))

    return bp
