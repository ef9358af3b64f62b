"""The program run with an identity (``python -m trio_dht -i``) serves its proxy's sign and encrypt routes,
checked by PyPI ``opendht`` 4.4.2 run with an identity:

* a client POSTs to ``/key/{hash}/sign``: 4.4.2's get returns the value owned by the program's key, its
  signature checked by 4.4.2;
* a client POSTs to ``/key/{hash}/encrypt`` with ``"to"`` = 4.4.2's long id: the program's node finds
  4.4.2's certificate on the DHT, and 4.4.2's get returns the value decrypted, for its own key id.

Debian's ``dhtnode`` 2.4.12 as a proxy client with an identity (``--proxyclient URL -i``) signs and encrypts
on its own side and POSTs the result to the plain put route: 4.4.2 gets its signed value, and the program's
node decrypts the one it encrypted for the program's key.

With ``CI=true`` a missing peer fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import re
import sys

import httpx
import pytest
import trio
from cli_process import LOOPBACK_NODE, TrioDhtProcess, free_tcp_port, trio_dht_process
from peers import (
    needs_dhtnode,
    needs_opendht,
    open_dhtnode_proxy_client,
    open_opendht_peer,
    poll_until,
    require_dhtnode,
    require_opendht,
)

from trio_dht import InfoHash
from trio_dht.client import open_proxy_client
from trio_dht.crypto import Certificate
from trio_dht.value import Value

pytestmark = pytest.mark.interop

LOOPBACK = "127.0.0.1"
KEY_ID = re.compile(r"identity: public key id ([0-9a-f]{40})")


def key_id_of(program: TrioDhtProcess) -> str:
    """The key id of the program's identity, from its startup lines."""
    match = KEY_ID.search(program.output)
    assert match, program.output
    return match.group(1)


@needs_opendht
async def test_the_proxy_signs_and_encrypts_for_opendht() -> None:
    require_opendht()
    port = free_tcp_port()
    command = [sys.executable, "-m", "trio_dht", *LOOPBACK_NODE, "-i"]
    command += ["--proxyserver", str(port), "--proxy-addr", LOOPBACK]
    async with trio_dht_process(command, timeout=60) as program:
        our_key_id = key_id_of(program)
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


@needs_opendht
@needs_dhtnode
async def test_the_cpp_proxy_client_with_an_identity_signs_and_encrypts_through_the_proxy() -> None:
    """``dhtnode --proxyclient URL -i`` signs and encrypts on its side, then POSTs the result to the plain
    put route: the proxy carries both to the DHT as they came."""
    require_opendht()
    require_dhtnode()
    port = free_tcp_port()
    command = [sys.executable, "-m", "trio_dht", *LOOPBACK_NODE, "-i"]
    command += ["--proxyserver", str(port), "--proxy-addr", LOOPBACK]
    async with trio_dht_process(command, timeout=60) as program:
        async with open_opendht_peer(bootstrap=(LOOPBACK, program.udp_port)) as real:
            await real.wait_for_nodes(1, timeout=15)
            url = f"http://{LOOPBACK}:{port}"
            async with open_dhtnode_proxy_client(url, extra_args=["-i"], start_timeout=60) as client:
                key = InfoHash.get("signed by dhtnode through the proxy")
                lines = await client.command(
                    f"s {key.hex()} signed-by-dhtnode", until="Put signed", timeout=30
                )
                assert "Put signed: success" in lines[-1], lines
                got = await poll_until(lambda: real.get(key), timeout=10)
                assert [(v["data"], v["utype"]) for v in got] == [(b"signed-by-dhtnode", "text/plain")]
                assert re.fullmatch("[0-9a-f]{40}", got[0]["owner"] or ""), got

                # 2.4.12 takes the recipient's key id and looks its certificate up at that key, where our node
                # announced its own (4.x announces at SHA-1 of the long id only): our node decrypts it.
                key = InfoHash.get("encrypted by dhtnode through the proxy")
                to = key_id_of(program)
                lines = await client.command(
                    f"e {key.hex()} {to} for-the-proxy", until="Put encrypted", timeout=30
                )
                assert "Put encrypted: success" in lines[-1], lines
                async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=20) as http:
                    (line,) = (await http.get(f"/key/{key.hex()}")).content.splitlines()
                doc = json.loads(line)
                assert (doc["data"], doc["to"], doc["utype"]) == ("Zm9yLXRoZS1wcm94eQ==", to, "text/plain")
                assert doc["owner"].startswith("-----BEGIN PUBLIC KEY-----")  # dhtnode's key, checked
        with trio.fail_after(15):
            assert await program.stop() == 0
