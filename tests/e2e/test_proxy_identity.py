"""The program run with an identity (``python -m trio_dht -i``) serves its proxy's sign and encrypt routes,
checked by PyPI ``opendht`` 4.4.2 run with an identity:

* a client POSTs to ``/key/{hash}/sign``: 4.4.2's get returns the value owned by the program's key, its
  signature checked by 4.4.2;
* a client POSTs to ``/key/{hash}/encrypt`` with ``"to"`` = 4.4.2's long id: the program's node finds
  4.4.2's certificate on the DHT, and 4.4.2's get returns the value decrypted, for its own key id.

With ``CI=true`` a missing peer fails these tests instead of skipping them.
"""

from __future__ import annotations

import re
import sys

import httpx
import pytest
import trio
from cli_process import LOOPBACK_NODE, free_tcp_port, trio_dht_process
from peers import needs_opendht, open_opendht_peer, poll_until, require_opendht

from trio_dht import InfoHash
from trio_dht.client import open_proxy_client
from trio_dht.crypto import Certificate
from trio_dht.value import Value

pytestmark = pytest.mark.interop

LOOPBACK = "127.0.0.1"
KEY_ID = re.compile(r"identity: public key id ([0-9a-f]{40})")


@needs_opendht
async def test_the_proxy_signs_and_encrypts_for_opendht() -> None:
    require_opendht()
    port = free_tcp_port()
    command = [sys.executable, "-m", "trio_dht", *LOOPBACK_NODE, "-i"]
    command += ["--proxyserver", str(port), "--proxy-addr", LOOPBACK]
    async with trio_dht_process(command, timeout=60) as program:
        match = KEY_ID.search(program.output)
        assert match, program.output
        our_key_id = match.group(1)
        async with open_opendht_peer(bootstrap=(LOOPBACK, program.udp_port), identity_bits=2048) as real:
            theirs = Certificate.from_pem(real.certificate_pem)
            await real.wait_for_nodes(1, timeout=15)
            async with open_proxy_client(f"http://{LOOPBACK}:{port}") as client:
                signed_key = InfoHash.get("signed by the trio_dht proxy")
                value = Value(b"signed by the proxy", utype="text/plain")
                assert await client.put_signed(signed_key, value)
                got = await poll_until(lambda: real.get(signed_key), timeout=10)
                assert [(v["id"], v["data"], v["owner"], v["utype"]) for v in got] == [
                    (value.id, b"signed by the proxy", our_key_id, "text/plain")
                ]

                sealed_key = InfoHash.get("encrypted by the trio_dht proxy")
                sealed = Value(b"for opendht only " * 20)  # longer than one RSA block: RSA + AES-GCM

                async def put_encrypted() -> bool:  # False until 4.4.2's certificate is on the DHT
                    return await client.put_encrypted(sealed_key, sealed, theirs.long_id)

                assert await poll_until(put_encrypted, timeout=20)
                got = await poll_until(lambda: real.get(sealed_key), timeout=10)
                assert [(v["id"], v["data"], v["owner"], v["recipient"]) for v in got] == [
                    (sealed.id, b"for opendht only " * 20, our_key_id, theirs.id.hex())
                ]

            # The same routes in raw HTTP, as an OpenDHT proxy client would write them.
            async with httpx.AsyncClient(base_url=f"http://{LOOPBACK}:{port}", trust_env=False) as http:
                r = await http.post(
                    f"/key/{InfoHash.get('raw').hex()}/encrypt",
                    json={"data": "eA==", "to": theirs.long_id.hex()},
                    timeout=20,
                )
                assert r.status_code == 200 and int(r.json()["id"]) > 0
                r = await http.post("/key/raw/encrypt", json={"data": "eA==", "to": "x"})
                assert r.status_code == 400 and r.json() == {"err": "No destination found"}
                r = await http.options("/raw")
                assert r.headers["access-control-allow-methods"].endswith(", SIGN, ENCRYPT")
        with trio.fail_after(15):
            assert await program.stop() == 0
