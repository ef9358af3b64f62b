"""Whether the node has good peers per family (sans-IO)."""

from trio_dht.node.connectivity import Connectivity, family_name

V4, V6 = False, True


def test_changes_per_family() -> None:
    peers = Connectivity()
    assert peers.describe() == "no good peer yet"
    assert peers.update({V4: False, V6: False}, now=5) == []  # nothing at the start, nothing changed
    assert peers.update({V4: True, V6: False}, now=10) == [(V4, True)]
    assert peers.describe() == "good peers over IPv4"
    assert peers.update({V4: True, V6: False}, now=15) == []  # per family, not per node
    assert peers.update({V4: True, V6: True}, now=20) == [(V6, True)]
    assert peers.describe() == "good peers over IPv4 and IPv6"
    assert peers.update({V4: False, V6: False}, now=30) == [(V4, False), (V6, False)]
    assert peers.describe() == "no good peer (all lost)"
    assert peers.update({V4: False, V6: True}, now=40) == [(V6, True)]
    assert peers.update({V4: False, V6: False}, now=50) == [(V6, False)]


def test_family_names() -> None:
    assert (family_name(V4), family_name(V6)) == ("IPv4", "IPv6")
