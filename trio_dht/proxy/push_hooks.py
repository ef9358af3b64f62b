"""The push side as the REST proxy sees it: :class:`ProxyPushHooks` (the proxy's ``PushHooks``) and
:class:`CountingGateway`, which counts the pushes handed to a gateway for ``/node/stats``.

The proxy calls the hooks for ``SUBSCRIBE`` and ``UNSUBSCRIBE`` (the :class:`PushService`'s), for
``POST /node/pingPush`` (a ``pong`` push, high priority), for permanent puts 2 h before they lapse (a
``timeout``/``vid`` push, normal priority) and for its stats document, into which they merge OpenDHT's push
fields (``pushListenersCount``, ``androidPush``, ``iosPush``, ``unifiedPush``) and ours
(``pushSubscriptions``, ``pushDelivery``: delivered, failed, retried, pruned tokens, and every bound reached:
requests past their deadline, oversized replies, one-off pushes given up, expired pushes, queue drops).
pingPush and permanent put warnings are one-off pushes: they belong to no subscription, so the dispatcher
bounds their attempts and their number.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

from trio_dht.proxy.permanent import PermanentPut
from trio_dht.proxy.request_counts import PUSH_BUCKETS, Histogram
from trio_dht.push.dispatcher import Dispatcher
from trio_dht.push.gateway import LOOKUP_STUCK, OVERSIZED, TIMED_OUT, Gateway, Outcome
from trio_dht.push.payloads import Platform, Push, PushKind
from trio_dht.push.service import PushService
from trio_dht.rest.value_json import PushTarget

STATS_NAMES = {
    Platform.ANDROID: "androidPush",
    Platform.IOS: "iosPush",
    Platform.NONE: "iosPush",  # sent as iOS, as OpenDHT does
    Platform.UNIFIEDPUSH: "unifiedPush",
}
"""The ``/node/stats`` field counting each platform's pushes."""


class PushCounts:
    """Pushes handed to gateways, by stats field and priority (OpenDHT counts attempts, not deliveries)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, bool]] = Counter()
        self.by_gateway: Counter[tuple[str, str]] = Counter()
        """Outcomes per gateway (an app's name): (gateway, outcome) -> pushes."""
        self.latency = Histogram(PUSH_BUCKETS)
        """Seconds from a value reaching a subscribed key (the push's ``t``) to the gateway accepting its
        push (``/metrics``)."""

    def count(self, push: Push) -> None:
        self.counts[(STATS_NAMES[push.platform], push.high_priority)] += 1

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            name: {
                "highPriorityCount": self.counts[(name, True)],
                "normalPriorityCount": self.counts[(name, False)],
            }
            for name in ("androidPush", "iosPush", "unifiedPush")
        }


class CountingGateway:
    """A gateway that counts every push it is asked to send, then lets ``inner`` send it."""

    def __init__(self, inner: Gateway, counts: PushCounts, name: str | None = None) -> None:
        self.inner = inner
        self.name = name or inner.name
        """What the dispatcher and ``/node/stats`` know the gateway by (an app's id)."""
        self.max_batch = inner.max_batch
        self._counts = counts

    def lane(self, push: Push) -> Hashable:
        return self.inner.lane(push)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    async def send(self, pushes: Sequence[Push]) -> list[Outcome]:
        for push in pushes:
            self._counts.count(push)
        try:
            outcomes = await self.inner.send(pushes)
        except Exception as exc:
            self._counts.by_gateway[(self.name, type(exc).__name__)] += len(pushes)
            raise
        by_gateway = self._counts.by_gateway
        now_ms = time.time() * 1000
        observe = self._counts.latency.observe
        for i, outcome in enumerate(outcomes):
            by_gateway[(self.name, outcome.value)] += 1
            if outcome is _DELIVERED and i < len(pushes) and pushes[i].kind is _VALUES:
                t = pushes[i].data.get("t")
                if t is not None:
                    observe(max(0.0, now_ms - t) / 1000)
        return outcomes


_DELIVERED = Outcome.DELIVERED
_VALUES = PushKind.VALUES


def _one_off_sid() -> int:
    """A slot of its own for a push that belongs to no subscription (never coalesced with another)."""
    return secrets.randbits(63) | 1


class ProxyPushHooks:
    """The proxy's :class:`~trio_dht.proxy.state.PushHooks`, backed by a :class:`PushService`."""

    def __init__(
        self, service: PushService, dispatcher: Dispatcher, counts: PushCounts | None = None
    ) -> None:
        self.service = service
        self.dispatcher = dispatcher
        self.counts = counts or PushCounts()
        self.subscribe = service.subscribe_now
        """``SUBSCRIBE``: the service's, answered without waiting."""
        self.unsubscribe = service.unsubscribe
        """``UNSUBSCRIBE``: the service's."""

    async def ping(self, target: PushTarget) -> None:
        """``{"pong": true, "to": client_id}`` at high priority (``POST /node/pingPush``)."""
        data = {"pong": True, "to": target.client_id}
        platform = Platform.parse(target.platform)
        push = Push(_one_off_sid(), PushKind.VALUES, target.token, platform, target.topic, data, True)
        self.dispatcher.submit(push, one_off=True)

    def permanent_put_due(self, held: PermanentPut) -> None:
        """``{"s", "timeout": <hash>, "to", "vid"}`` at normal priority: re-POST this value soon."""
        target = held.push
        if target is None or not target.token:
            return
        data = {
            "s": target.session_id,
            "timeout": held.key.hex(),
            "to": target.client_id,
            "vid": str(held.value.id),
        }
        platform = Platform.parse(target.platform)
        push = Push(_one_off_sid(), PushKind.TIMEOUT, target.token, platform, target.topic, data, False)
        self.dispatcher.submit(push, one_off=True)

    def _gateway_stats(self) -> dict[str, dict[str, int]]:
        """Pushes per gateway (app) and outcome, e.g. ``{"android-app": {"delivered": 3}}``."""
        out: dict[str, dict[str, int]] = {}
        for (name, outcome), count in sorted(self.counts.by_gateway.items()):
            out.setdefault(name, {})[outcome] = count
        return out

    def stats(self) -> dict[str, Any]:
        delivery = self.dispatcher.stats
        service = self.service.stats
        return {
            "pushListenersCount": self.service.push_listeners_count,
            **self.counts.stats(),
            "pushSubscriptions": {
                "active": len(self.service.book),
                "watchedKeys": self.service.watched_keys,
                "subscribed": service["subscribed"],
                "refreshed": service["refreshed"],
                "unsubscribed": service["unsubscribed"],
                "expired": service["expired"],
                "timeoutPushes": service["timeout-pushes"],
                "restored": service["restored"],
                "prunedTokens": service["pruned"],
                "sources": self.service.book.source_count,
                "refusedPerSource": self.service.book.refused_per_source,
                "refusedFull": self.service.book.refused_full,
                "saveErrors": service["save-errors"],
            },
            "pushGateways": self._gateway_stats(),
            "pushDelivery": {
                "queued": len(self.dispatcher.queue),
                "inFlight": self.dispatcher.in_flight,
                "delivered": delivery[Outcome.DELIVERED.value],
                "failures": delivery["batch-failed"] + delivery[Outcome.DROPPED.value] + delivery["dropped"],
                "retries": delivery[Outcome.RETRY.value] + delivery["batch-failed"],
                "gaveUp": delivery["gave-up"],
                "tokensGone": delivery[Outcome.TOKEN_GONE.value],
                "coalesced": delivery["coalesced"],
                "noGateway": delivery["no-gateway"],
                "timeouts": delivery[TIMED_OUT],
                "oversizedReplies": delivery[OVERSIZED],
                "expired": delivery["expired"],
                "oneOffGaveUp": delivery["one-off-gave-up"],
                "queueFull": delivery["queue-full"],
                "laneFull": delivery["lane-full"],
                "lookupStuck": delivery[LOOKUP_STUCK],
            },
        }
