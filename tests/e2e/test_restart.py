"""With ``-f``, the real program comes back as itself: the same node id, the nodes it knew (it rejoins without
``-b``), and the values it stored for others."""

from __future__ import annotations

import sys
from pathlib import Path

import trio
from cli_process import LOOPBACK_NODE, trio_dht_process

from trio_dht.infohash import InfoHash
from trio_dht.node import open_node
from trio_dht.value import Value

KEY = InfoHash.get("kept across a restart")


async def test_a_restarted_node_comes_back_as_itself(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    command = [sys.executable, "-m", "trio_dht", *LOOPBACK_NODE, "--no-proxy", "-f", str(state)]
    async with open_node(port=0, host="127.0.0.1", host6=None) as peer:
        async with trio_dht_process([*command, "-b", f"127.0.0.1:{peer.bound_port}"]) as first:
            with trio.fail_after(20):
                while not peer.is_connected():  # the peer confirms the node that pinged it
                    await trio.sleep(0.05)
                assert await peer.put(KEY, Value(data=b"stored for others", id=77))
            assert await first.stop() == 0
        async with trio_dht_process(command) as second:  # no -b: it rejoins through the nodes it knew
            assert second.node_id == first.node_id
            assert "came back as" in second.output and "1 of 1 saved values still alive" in second.output
            reply = await peer.request(("127.0.0.1", second.udp_port), "get", {"h": KEY})
            assert [v.data for v in reply.values] == [b"stored for others"]
            node_id = InfoHash(bytes.fromhex(second.node_id))
            with trio.fail_after(20):  # it pinged the peer it knew, which now knows its new port
                while (known := peer.tables[False].get(node_id)) is None or known.addr[1] != second.udp_port:
                    await trio.sleep(0.05)
            assert await second.stop() == 0
