"""``trio-dht client --proxy URL COMMAND``: the proxy client from a shell.

Commands (keys as the proxy reads ``/key/{KEY}``: 40 hex digits as they are, anything else hashed):

- ``get KEY``: the values, one value JSON per line (plus ``"text"`` when the data is UTF-8);
- ``put KEY TEXT [--permanent]``: the stored value's JSON (with the id the proxy gave it);
- ``listen KEY``: current values then every change as JSON lines (``"expired": true`` for values that went
  away) until Ctrl-C. With ``--push-token`` it SUBSCRIBEs instead, and reads the pushes the device would
  receive from stdin (one JSON object per line) to feed them in;
- ``push JSON [--listen KEY ...]``: listen on the keys given (by default the one the push names), feed the
  push in, print what it delivered, then ``{"result": ...}``: for trying a push by hand;
- ``status``: the proxy's health as JSON.

Exit codes: 0 (also after Ctrl-C), 1 when the proxy failed or refused (one line on stderr), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack, suppress
from typing import Any

import trio

from trio_dht.api import ValueEvent
from trio_dht.cli import leaf_exceptions
from trio_dht.client.ndjson import LineSplitter
from trio_dht.client.proxy_client import (
    DEFAULT_CLIENT_ID,
    DEFAULT_TIMEOUT,
    ProxyClient,
    ProxyError,
    open_proxy_client,
)
from trio_dht.client.push_state import InvalidPushNotification, parse_notification
from trio_dht.infohash import InfoHash
from trio_dht.push.payloads import Dialect
from trio_dht.rest.keys import hash_from_segment
from trio_dht.rest.value_json import dumps, value_to_json
from trio_dht.value import Value


class CommandFailed(Exception):
    """A command that ran but could not do what was asked (exit code 1)."""


def key_of(text: str) -> InfoHash:
    """The DHT key ``text`` names, by the proxy's ``{hash}`` rule."""
    return hash_from_segment(text.encode("utf-8"))


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be positive")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The ``client`` options and commands, on ``parser``."""
    parser.add_argument("--proxy", required=True, metavar="URL", help="the proxy, e.g. http://127.0.0.1:8000")
    parser.add_argument("--push-token", metavar="TOKEN", help="device push token: listen SUBSCRIBEs")
    parser.add_argument("--platform", default="android", help="android, ios or unifiedpush (default android)")
    parser.add_argument("--topic", default="", help="push topic (iOS bundle id)")
    parser.add_argument("--client-id", default=DEFAULT_CLIENT_ID, help=f"default {DEFAULT_CLIENT_ID}")
    parser.add_argument("--session-id", help="this session's id (default: random)")
    parser.add_argument(
        "--dialect",
        choices=[d.value for d in Dialect],
        default="current",
        help="push protocol (default current)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        help=f"seconds per request (default {DEFAULT_TIMEOUT:g})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    get = commands.add_parser("get", help="print the values under KEY")
    get.add_argument("key", metavar="KEY")
    put = commands.add_parser("put", help="store TEXT under KEY")
    put.add_argument("key", metavar="KEY")
    put.add_argument("text", metavar="TEXT")
    put.add_argument("--permanent", action="store_true", help="a permanent put (the proxy keeps it 24 h)")
    put.add_argument("--type", type=int, default=0, help="value type (default 0)")
    listen = commands.add_parser("listen", help="print values and changes under KEY until Ctrl-C")
    listen.add_argument("key", metavar="KEY")
    push = commands.add_parser("push", help="feed a received push notification in")
    push.add_argument("notification", metavar="JSON")
    push.add_argument("--listen", action="append", default=[], metavar="KEY", help="listen on KEY first")
    commands.add_parser("status", help="print the proxy's health")


def _print(doc: Any) -> None:
    sys.stdout.write(dumps(doc).decode("ascii") + "\n")
    sys.stdout.flush()


def _event_json(event: ValueEvent) -> dict[str, Any]:
    doc = value_to_json(event.value, expired=event.expired)
    if not event.value.cypher:
        with suppress(UnicodeDecodeError):
            doc["text"] = event.value.data.decode("utf-8")
    return doc


async def run_client(args: argparse.Namespace) -> None:
    """Run the parsed ``client`` command; raises :class:`ProxyError` or :class:`CommandFailed`."""
    async with open_proxy_client(
        args.proxy,
        push_token=args.push_token or None,
        platform=args.platform,
        topic=args.topic,
        client_id=args.client_id,
        dialect=args.dialect,
        session_id=args.session_id,
        timeout=args.timeout,
    ) as dht:
        if not dht.connected:
            print(f"trio-dht client: warning: proxy {dht.status.value}: {dht.health.error}", file=sys.stderr)
        command = args.command
        if command == "status":
            _print(dht.health.to_json())
        elif command == "get":
            for value in await dht.get(key_of(args.key)):
                _print(_event_json(ValueEvent(value)))
        elif command == "put":
            value = Value(data=args.text.encode("utf-8"), type=args.type)
            if not await dht.put(key_of(args.key), value, permanent=args.permanent):
                raise CommandFailed("the proxy could not store the value (put failed)")
            _print(value_to_json(value))
        elif command == "listen":
            await _listen(dht, key_of(args.key))
        elif command == "push":
            await _push(dht, args.notification, [key_of(k) for k in args.listen])


async def _listen(dht: ProxyClient, key: InfoHash) -> None:
    async with trio.open_nursery() as nursery, dht.listen(key) as events:
        if dht.push_mode:
            nursery.start_soon(_feed_stdin_pushes, dht)
        async for event in events:
            _print(_event_json(event))


async def _feed_stdin_pushes(dht: ProxyClient) -> None:
    """Each JSON line on stdin is a push the device received."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    splitter = LineSplitter()
    async with stdin:
        while chunk := await stdin.receive_some():
            for line in splitter.feed(chunk):
                await _feed_one(dht, line)
        for line in splitter.end():
            await _feed_one(dht, line)


async def _feed_one(dht: ProxyClient, line: bytes) -> None:
    try:
        result = await dht.push_notification_received(line)
    except (InvalidPushNotification, ProxyError) as exc:
        print(f"trio-dht client: push: {exc}", file=sys.stderr)
        return
    print(f"trio-dht client: push: {result.value}", file=sys.stderr)


async def _push(dht: ProxyClient, notification: str, keys: list[InfoHash]) -> None:
    try:
        data = parse_notification(notification)
    except InvalidPushNotification as exc:
        raise CommandFailed(str(exc)) from None
    if not keys:
        named = data.get("key") or data.get("timeout")
        try:
            keys = [InfoHash.from_hex(named)] if named else []
        except ValueError:
            keys = []
    async with AsyncExitStack() as stack:
        channels = [await stack.enter_async_context(dht.listen(key)) for key in keys]
        await _drain(channels)
        result = await dht.push_notification_received(data)
        await _drain(channels)
    _print({"result": result.value})


async def _drain(channels: list[Any], quiet: float = 0.3, limit: float = 5.0) -> None:
    """Print listen events until none came for ``quiet`` seconds (streams deliver asynchronously)."""
    with trio.move_on_after(limit):
        while True:
            got = False
            for channel in channels:
                while True:
                    try:
                        event = channel.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    got = True
                    _print(_event_json(event))
            if not got:
                with trio.move_on_after(quiet) as waited:
                    async with trio.open_nursery() as nursery:
                        for channel in channels:
                            nursery.start_soon(_peek, channel, nursery.cancel_scope)
                if waited.cancelled_caught:
                    return


async def _peek(channel: Any, done: trio.CancelScope) -> None:
    """Wait until ``channel`` has an event (printed by the caller's next pass), then stop the wait."""
    try:
        event = await channel.receive()
    except trio.EndOfChannel:
        await trio.sleep_forever()
    _print(_event_json(event))
    done.cancel()


def client_main(argv: Sequence[str]) -> int:
    """``trio-dht client ARGV...``: parse, run, and return the exit code."""
    parser = argparse.ArgumentParser(prog="trio-dht client", description=__doc__.split("\n\n")[0])
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        trio.run(run_client, args)
    except KeyboardInterrupt:
        return 0
    except BaseExceptionGroup as group:
        leaves = leaf_exceptions(group)
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return 0
        failures = [leaf for leaf in leaves if isinstance(leaf, ProxyError | CommandFailed)]
        if not failures or len(failures) != len(leaves):
            raise
        print(f"trio-dht client: error: {failures[0]}", file=sys.stderr)
        return 1
    except (ProxyError, CommandFailed) as exc:
        print(f"trio-dht client: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(client_main(sys.argv[1:]))
