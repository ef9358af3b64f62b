"""The program's identity flags, as dhtnode's: ``-i`` runs with a new identity, ``--save-identity`` writes it,
``--certificate``/``--privkey`` run with a saved one; the node id derives from the key."""

from __future__ import annotations

import hashlib
import re
import stat
import sys
from pathlib import Path

from cli_process import LOOPBACK_NODE, trio_dht_process

COMMAND = [sys.executable, "-m", "trio_dht", *LOOPBACK_NODE, "--no-proxy"]
KEY_ID = re.compile(r"identity: public key id ([0-9a-f]{40})")


def key_id(output: str) -> str:
    match = KEY_ID.search(output)
    assert match, output
    return match.group(1)


async def test_a_new_identity_is_saved_and_runs_again(tmp_path: Path) -> None:
    path = tmp_path / "node"
    async with trio_dht_process([*COMMAND, "-i", "--save-identity", str(path)], timeout=60) as first:
        kid = key_id(first.output)
        assert first.node_id == hashlib.sha1(f"node:{kid}".encode()).hexdigest()
        assert await first.stop() == 0
    assert stat.S_IMODE((tmp_path / "node.pem").stat().st_mode) == 0o600
    assert (tmp_path / "node.crt").read_text().startswith("-----BEGIN CERTIFICATE-----")
    flags = ["--certificate", str(tmp_path / "node.crt"), "--privkey", str(tmp_path / "node.pem")]
    async with trio_dht_process([*COMMAND, *flags]) as second:
        assert key_id(second.output) == kid and second.node_id == first.node_id
        assert await second.stop() == 0


async def test_a_bad_identity_file_is_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "bad.crt").write_text("not a certificate")
    (tmp_path / "bad.pem").write_text("not a key")
    flags = ["--certificate", str(tmp_path / "bad.crt"), "--privkey", str(tmp_path / "bad.pem")]
    async with trio_dht_process([*COMMAND, *flags]) as process:
        assert await process.process.wait() == 1
        assert "CryptoError" in process.output and "Traceback" not in process.output
