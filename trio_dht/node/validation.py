"""Anti-amplification: what a node may send to an address it has not validated, sans-IO.

UDP source addresses can be forged, so an answer may land on a victim who never asked. As QUIC does for an
unvalidated client, a node sends an address at most ``Limits.udp_amplification`` times the bytes it received
from it until the address is validated: it answered a request of ours (a reply whose ``t`` is a request we
sent to that address), or it presented a write token, which we only ever send to the address it is bound to.
What does not fit is not sent (the node answers with less: a get without its values, fewer nodes).

A real OpenDHT node takes a get answered without values as "none here" and does not ask again, but it resends
a request left unanswered after a second. So the first get from an unvalidated address whose values do not
fit is left unanswered (:meth:`AddressValidation.defer`, once per address) while the node pings the address:
its resend, once the ping is answered, gets the values. Later ones get the smaller answer at once.

Both tables (validated addresses, and the byte counts of unvalidated ones) hold at most
``Limits.udp_validated_addresses`` entries each; the least recently used entry is evicted, which only ever
makes the node send less (an evicted address is unvalidated again, with no credit).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from trio_dht.limits import DEFAULT, Limits
from trio_dht.wire.compact import Address, NodeRecord
from trio_dht.wire.message import Encoder

INFINITE = math.inf


class AddressValidation:
    """Validated addresses, and the credit (factor x bytes received - bytes sent) of the others."""

    def __init__(self, limits: Limits = DEFAULT) -> None:
        self.factor = limits.udp_amplification
        self.capacity = limits.udp_validated_addresses
        self._validated: OrderedDict[Address, None] = OrderedDict()
        self._credit: OrderedDict[Address, list[float]] = OrderedDict()
        """Per unvalidated address: [bytes we may still send, 1.0 once an answer was deferred]."""
        self.evicted = 0
        self.limited = 0
        """Answers cut down (or not sent) to stay within the credit of an unvalidated address."""
        self.withheld_bytes = 0
        """Bytes not sent for that reason."""
        self.deferred = 0
        """Answers left unsent for the sender's resend (see :meth:`defer`)."""

    def __len__(self) -> int:
        return len(self._validated)

    def is_validated(self, addr: Address) -> bool:
        validated = self._validated
        if addr in validated:
            validated.move_to_end(addr)
            return True
        return False

    def validate(self, addr: Address) -> None:
        """``addr`` proved it receives what we send it."""
        validated = self._validated
        if addr in validated:
            validated.move_to_end(addr)
            return
        self._credit.pop(addr, None)
        validated[addr] = None
        if len(validated) > self.capacity:
            validated.popitem(last=False)
            self.evicted += 1

    def received(self, addr: Address, size: int) -> float:
        """Count ``size`` bytes received from ``addr``; returns the bytes we may send it: infinite once it is
        validated (one call per datagram, as both are asked of every request)."""
        validated = self._validated
        if addr in validated:
            validated.move_to_end(addr)
            return INFINITE
        credit = self._credit
        entry = credit.get(addr)
        if entry is None:
            entry = credit[addr] = [0.0, 0.0]
            if len(credit) > self.capacity:
                credit.popitem(last=False)
                self.evicted += 1
        else:
            credit.move_to_end(addr)
        entry[0] += self.factor * size
        return entry[0]

    def credit(self, addr: Address) -> float:
        """Bytes we may still send to ``addr`` (infinite once validated)."""
        if addr in self._validated:
            return INFINITE
        entry = self._credit.get(addr)
        return entry[0] if entry is not None else 0.0

    def spend(self, addr: Address, size: int) -> None:
        """``size`` bytes sent to an unvalidated ``addr`` (within its credit)."""
        entry = self._credit.get(addr)
        if entry is not None:
            entry[0] -= size

    def defer(self, addr: Address) -> bool:
        """True the first time only (per unvalidated address): leave this answer unsent, for the sender's
        resend to find the address validated."""
        entry = self._credit.get(addr)
        if entry is None or entry[1]:
            return False
        entry[1] = 1.0
        self.deferred += 1
        return True

    def withheld(self, size: int) -> None:
        """Count an answer cut down by ``size`` bytes."""
        self.limited += 1
        self.withheld_bytes += size

    def within_credit(
        self,
        addr: Address,
        method: str,
        datagrams: list[bytes],
        credit: float,
        pinging: bool,
        smaller: Callable[..., Iterable[bytes]],
        *smaller_args: Any,
    ) -> list[bytes]:
        """What may be sent to ``addr`` as the answer ``datagrams`` to a ``method`` request: all of it if
        ``addr`` is validated by now (a write token in the request validates it) or it fits ``credit``;
        else, the first time, nothing while ``pinging`` validates the address (for a get: the sender's resend
        gets the whole answer); else the first of ``smaller(*smaller_args)`` that fits (called only then, so
        the common case builds nothing); else nothing. What is sent is spent from the credit, what is not is
        counted."""
        if addr in self._validated:
            return datagrams
        size = sum(map(len, datagrams))
        if size <= credit:
            entry = self._credit.get(addr)
            if entry is not None:
                entry[0] -= size
            return datagrams
        if pinging and method == "get" and self.defer(addr):
            self.withheld(size)
            return []
        for answer in smaller(*smaller_args):
            if len(answer) <= credit:
                self.spend(addr, len(answer))
                self.withheld(size - len(answer))
                return [answer]
        self.withheld(size)
        return []


def smaller_answers(
    encoder: Encoder,
    tid: int,
    method: str,
    sa: bytes,
    token: bytes,
    nodes4: list[NodeRecord],
    nodes6: list[NodeRecord],
    half: int,
) -> Iterable[bytes]:
    """Answers to a get or find with less in them, largest first: the nodes without values (a get), then
    ``half`` as many nodes, then none (the token alone)."""
    if method == "get":
        yield encoder.reply(tid, Encoder.nodes_body(sa, nodes4, nodes6, token))
    yield encoder.reply(tid, Encoder.nodes_body(sa, nodes4[:half], nodes6[:half], token))
    yield encoder.reply(tid, Encoder.nodes_body(sa, [], [], token))
