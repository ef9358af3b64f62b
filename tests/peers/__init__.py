"""Real OpenDHT peers on loopback for interop tests.

* :func:`open_opendht_peer`: the PyPI ``opendht`` 4.4.2 C++ node, in a child process.
* :func:`open_dhtnode_peer`: Debian's ``dhtnode`` 2.4.12, data through its REST proxy.
* :func:`open_dhtnode_proxy_client`: ``dhtnode --proxyclient URL``, OpenDHT's C++ proxy client.

Both peers share one API: ``put(key, data, *, value_type, utype, value_id) -> bool``,
``get(key) -> [{"id", "data", "type", "utype"}]``, ``async with peer.listen(key) as events``
(``{"id", "data", "type", "utype", "expired"}``), ``node_id()``, ``good_nodes()``,
``wait_for_nodes()``, ``bootstrap(host, port)``, and ``peer.port`` / ``peer.address`` (UDP).
Mark interop tests ``@pytest.mark.interop`` plus ``@needs_opendht`` / ``@needs_dhtnode`` (a clean
skip with the reason when the peer is missing) and call :func:`require_opendht` /
:func:`require_dhtnode` first in the test: with ``CI=true`` a missing peer fails the test.
"""

from ._support import (
    PeerError,
    PeerUnavailable,
    dhtnode_path,
    free_port,
    needs_dhtnode,
    needs_opendht,
    opendht_available,
    poll_until,
    require_dhtnode,
    require_opendht,
    skip_or_fail,
)
from .dhtnode_peer import (
    DhtnodePeer,
    DhtnodePrompt,
    open_dhtnode_peer,
    open_dhtnode_prompt,
    open_dhtnode_proxy_client,
    parse_value_line,
)
from .opendht_peer import OpenDhtPeer, open_opendht_peer

__all__ = [
    "DhtnodePeer",
    "DhtnodePrompt",
    "OpenDhtPeer",
    "PeerError",
    "PeerUnavailable",
    "dhtnode_path",
    "free_port",
    "needs_dhtnode",
    "needs_opendht",
    "open_dhtnode_peer",
    "open_dhtnode_prompt",
    "open_dhtnode_proxy_client",
    "open_opendht_peer",
    "opendht_available",
    "parse_value_line",
    "poll_until",
    "require_dhtnode",
    "require_opendht",
    "skip_or_fail",
]
