"""trio_dht.crypto: the certificate OpenDHT's generateIdentity makes, PEM files, key ids, refusal of keys and
files we do not accept, and signing values our verifier accepts."""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import os
import secrets
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtensionOID, NameOID

from trio_dht import crypto, purecrypto, signature
from trio_dht.crypto import Certificate, CryptoError, Identity, PublicKey
from trio_dht.infohash import InfoHash
from trio_dht.value import Value


def _der(tag: int, content: bytes) -> bytes:
    if len(content) < 0x80:
        return bytes([tag, len(content)]) + content
    length = len(content).to_bytes((len(content).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _fake_rsa_private_pem(bits: int) -> bytes:
    """A PKCS#1 RSA private key of ``bits`` whose numbers are not a key (cheap; only its size is read)."""
    n = (1 << (bits - 1)) | secrets.randbits(bits - 2) | 1
    p = (1 << (bits // 2 - 1)) | secrets.randbits(bits // 2 - 2) | 1
    ints = (0, n, 65537, n - 2, p, p + 2, p - 2, p, 5)
    body = _der(0x30, b"".join(_der(0x02, x.to_bytes(x.bit_length() // 8 + 1, "big")) for x in ints))
    return (
        b"-----BEGIN RSA PRIVATE KEY-----\n" + base64.encodebytes(body) + b"-----END RSA PRIVATE KEY-----\n"
    )


def _certificate_for(public: rsa.RSAPublicKey, signer: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(signer, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# -- the certificate ---------------------------------------------------------------------------------------


def test_generated_certificate_has_opendhts_fields(identity: Identity) -> None:
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    cert = Identity.generate("my node", bits=2048).certificate.x509
    after = datetime.datetime.now(datetime.UTC)
    key_id = hashlib.sha1(
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).hexdigest()
    assert cert.version == x509.Version.v3
    subject = [(a.oid, a.value, a._type) for a in cert.subject]
    assert subject == [
        (NameOID.COMMON_NAME, "my node", _ASN1Type.PrintableString),
        (NameOID.USER_ID, key_id, _ASN1Type.PrintableString),
    ]
    assert len(cert.subject.rdns) == 2  # one attribute per RDN, as GnuTLS writes them
    assert cert.issuer == cert.subject
    assert 1 <= cert.serial_number < 2**63
    assert before <= cert.not_valid_before_utc <= after
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=3650)
    assert [(e.oid, e.critical) for e in cert.extensions] == [
        (ExtensionOID.SUBJECT_KEY_IDENTIFIER, False),
        (ExtensionOID.BASIC_CONSTRAINTS, True),
        (ExtensionOID.KEY_USAGE, True),
    ]
    assert cert.extensions[0].value.digest.hex() == key_id
    assert cert.extensions[1].value == x509.BasicConstraints(ca=True, path_length=None)
    usage = cert.extensions[2].value
    assert usage.key_cert_sign and usage.crl_sign
    assert not (usage.digital_signature or usage.data_encipherment or usage.key_encipherment)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(cert)  # self-signed
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 2048 and key.public_numbers().e == 65537


def test_a_4096_bit_identity_is_signed_with_sha384() -> None:
    identity = Identity.generate()
    assert identity.public_key.bits == 4096 and identity.certificate.name == "trio_dht"
    assert isinstance(identity.certificate.x509.signature_hash_algorithm, hashes.SHA384)
    assert signature.verify(identity.sign_value(Value(b"big key", id=1)))


def test_names_outside_printable_string_are_utf8() -> None:
    for name in ("n\u0153ud_1", "a'b", "a*b"):
        cert = crypto.self_signed_certificate(rsa_2048_key(), name)
        common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0]
        assert (common_name.value, common_name._type) == (name, _ASN1Type.UTF8String)
    cert = crypto.self_signed_certificate(rsa_2048_key(), "a(b)+,-./:=?Z9 x")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0]._type == _ASN1Type.PrintableString


_KEYS: list[rsa.RSAPrivateKey] = []


def rsa_2048_key() -> rsa.RSAPrivateKey:
    if not _KEYS:
        _KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _KEYS[0]


@pytest.mark.parametrize("bits", [1024, 2047, 4097, 8192])
def test_generate_refuses_other_key_sizes_before_any_work(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rsa, "generate_private_key", lambda **_: pytest.fail("generated a key"))
    with pytest.raises(CryptoError, match="2048 to 4096 bits"):
        Identity.generate("x", bits=bits)


@pytest.mark.parametrize("name", ["", "x" * 65])
def test_generate_refuses_empty_or_overlong_names(name: str) -> None:
    with pytest.raises(CryptoError, match="1 to 64 characters"):
        Identity.generate(name, bits=2048)


# -- ids -------------------------------------------------------------------------------------------------


def test_public_key_ids(identity: Identity) -> None:
    der = identity.certificate.x509.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key = identity.public_key
    assert key.der == der
    assert isinstance(key.id, InfoHash) and key.id == hashlib.sha1(der).digest() == identity.id
    assert key.long_id == hashlib.sha256(der).digest() and len(key.long_id) == 32
    assert key.pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert serialization.load_pem_public_key(key.pem).public_numbers() == key.key().public_numbers()
    assert PublicKey.from_der(der) == key
    assert identity.certificate.id == key.id and identity.certificate.long_id == key.long_id
    assert Value(owner=der, signature=b"x").owner_id == key.id  # the value's owner id is the same id


def test_public_key_from_der_refuses_other_keys() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    e3 = rsa.generate_private_key(public_exponent=3, key_size=2048).public_key()
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    for key in (small, e3, ec_key):
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        with pytest.raises(CryptoError):
            PublicKey.from_der(der)
    for junk in (b"", b"junk", b"\x30\x03\x02\x01\x01"):
        with pytest.raises(CryptoError):
            PublicKey.from_der(junk)


# -- files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("password", [None, "secret", b"bytes secret"])
def test_save_then_load_round_trips(identity: Identity, tmp_path: Path, password: str | bytes | None) -> None:
    key_path, cert_path = tmp_path / "node.pem", tmp_path / "node.crt"
    old_umask = os.umask(0)
    try:
        identity.save(key_path, cert_path, password=password)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key_text = key_path.read_bytes()
    header = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" if password else b"-----BEGIN PRIVATE KEY-----"
    assert key_text.startswith(header)
    assert cert_path.read_bytes() == identity.certificate.pem
    assert cert_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    loaded = Identity.load(key_path, cert_path, password=password)
    assert loaded.id == identity.id and loaded.certificate.der == identity.certificate.der
    assert loaded.private_key.private_numbers() == identity.private_key.private_numbers()
    assert [p.name for p in tmp_path.iterdir()] in (["node.pem", "node.crt"], ["node.crt", "node.pem"])
    identity.save(key_path, cert_path, password=password)  # overwriting keeps the mode
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_load_refuses_a_wrong_password_or_someone_elses_key(
    identity: Identity, other: Identity, tmp_path: Path
) -> None:
    identity.save(tmp_path / "k.pem", tmp_path / "c.crt", password="right")
    with pytest.raises(CryptoError, match="password"):
        Identity.load(tmp_path / "k.pem", tmp_path / "c.crt", password="wrong")
    with pytest.raises(CryptoError, match="password"):
        Identity.load(tmp_path / "k.pem", tmp_path / "c.crt")
    other.save(tmp_path / "k2.pem", tmp_path / "c2.crt")
    with pytest.raises(CryptoError, match="not the certificate's"):
        Identity.load(tmp_path / "k2.pem", tmp_path / "c.crt")


def test_load_keeps_the_issuers_of_a_chain(identity: Identity, other: Identity, tmp_path: Path) -> None:
    identity.save(tmp_path / "k.pem", tmp_path / "c.crt")
    (tmp_path / "c.crt").write_bytes(identity.certificate.pem + other.certificate.pem)
    loaded = Identity.load(tmp_path / "k.pem", tmp_path / "c.crt")
    assert loaded.id == identity.id
    assert [c.serial_number for c in loaded.certificate.issuers] == [other.certificate.x509.serial_number]
    assert loaded.certificate.pem == identity.certificate.pem + other.certificate.pem


def _bad_key_files(identity: Identity) -> dict[str, bytes]:
    return {
        "exponent 3": _pem_key(rsa.generate_private_key(public_exponent=3, key_size=2048)),
        "1024 bits": _pem_key(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        "8192 bits": _fake_rsa_private_pem(8192),
        "16384 bits": _fake_rsa_private_pem(16384),
        "EC key": ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        "garbage PEM": b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        "not PEM": os.urandom(300),
        "empty": b"",
        "a certificate": identity.certificate.pem,
        "oversized": b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 70_000 + b"\n-----END PRIVATE KEY-----\n",
    }


def test_load_refuses_bad_key_files_with_a_clear_error(identity: Identity, tmp_path: Path) -> None:
    cert_path = tmp_path / "c.crt"
    cert_path.write_bytes(identity.certificate.pem)
    for what, data in _bad_key_files(identity).items():
        key_path = tmp_path / "bad.pem"
        key_path.write_bytes(data)
        with pytest.raises(CryptoError, match="private key"):
            Identity.load(key_path, cert_path)
            pytest.fail(f"accepted: {what}")
    with pytest.raises(CryptoError, match="No such file"):
        Identity.load(tmp_path / "missing.pem", cert_path)


def test_load_refuses_bad_certificate_files(identity: Identity, tmp_path: Path) -> None:
    identity.save(tmp_path / "k.pem", tmp_path / "c.crt")
    signer = rsa_2048_key()
    e3 = rsa.generate_private_key(public_exponent=3, key_size=2048).public_key()
    huge = rsa.RSAPublicNumbers(65537, (1 << 8191) | secrets.randbits(8190) | 1).public_key()
    bad = {
        "exponent 3": _certificate_for(e3, signer),
        "8192 bits": _certificate_for(huge, signer),
        "EC key": _certificate_for(ec.generate_private_key(ec.SECP256R1()).public_key(), signer),
        "DER": identity.certificate.der,
        "garbage PEM": b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        "a key": (tmp_path / "k.pem").read_bytes(),
        "empty": b"",
        "oversized": identity.certificate.pem * 60,
    }
    for what, data in bad.items():
        (tmp_path / "bad.crt").write_bytes(data)
        with pytest.raises(CryptoError, match="certificate"):
            Identity.load(tmp_path / "k.pem", tmp_path / "bad.crt")
            pytest.fail(f"accepted: {what}")
    assert Certificate.from_der(identity.certificate.der).id == identity.id
    with pytest.raises(CryptoError):
        Certificate.from_der(b"junk")


# -- signing ---------------------------------------------------------------------------------------------


def test_sign_is_rsa_pkcs1v15_sha512(identity: Identity) -> None:
    sig = identity.sign(b"some bytes")
    assert len(sig) == 256
    identity.private_key.public_key().verify(sig, b"some bytes", padding.PKCS1v15(), hashes.SHA512())
    assert purecrypto.rsa_verify_pkcs1v15_sha512(identity.public_key.der, sig, b"some bytes")
    assert signature.verify_rsa_sha512(identity.public_key.der, sig, b"some bytes", 4096)


def test_signed_values_verify(identity: Identity) -> None:
    value = Value(b"hello", type=3, id=7, utype="text/plain", prio=1)
    signed = identity.sign_value(value)
    assert signed.owner == identity.public_key.der and signed.owner_id == identity.id
    assert (signed.data, signed.type, signed.id, signed.seq, signed.utype, signed.prio) == (
        b"hello",
        3,
        7,
        0,
        "text/plain",
        1,
    )
    assert signed.is_signed and value.owner is None  # the value itself is not changed
    assert signature.Verifier().verify(signed)
    assert signature.verify(Value.unpack(signed.packed()))
    sig = signed.signature
    assert identity.sign(signed.signed_bytes()) == sig  # PKCS#1 v1.5 is deterministic
    recipient = identity.sign_value(Value(b"to you", id=8, recipient=bytes(range(20))))
    assert signature.verify(Value.unpack(recipient.packed())) and b"to" in recipient.signed_bytes()
    with pytest.raises(ValueError, match="encrypted"):
        identity.sign_value(Value(id=9, cypher=b"opaque"))


def test_seq_follows_previous_values_of_ours(identity: Identity, other: Identity) -> None:
    assert identity.sign_value(Value(b"a", id=1, seq=4)).seq == 4
    ours = identity.sign_value(Value(b"old", id=1, seq=6))
    theirs = other.sign_value(Value(b"old", id=1, seq=40))
    other_id = identity.sign_value(Value(b"old", id=2, seq=50))
    assert identity.sign_value(Value(b"new", id=1), previous=[ours, theirs, other_id]).seq == 7
    assert identity.sign_value(Value(b"new", id=1, seq=9), previous=[ours]).seq == 9
    edited = identity.sign_value(Value(b"new", id=1, seq=6), previous=[ours])
    assert edited.seq == 7 and signature.verify(edited)
    last = identity.sign_value(Value(b"x", id=1, seq=0xFFFF))
    with pytest.raises(ValueError, match="uint16"):
        identity.sign_value(Value(b"y", id=1), previous=[last])


def test_sign_value_with_a_bare_key() -> None:
    key = rsa_2048_key()
    signed = crypto.sign_value(key, Value(b"v", id=3, seq=2))
    assert signed.seq == 2 and signature.verify(signed)
    assert PublicKey.from_der(signed.owner).key().public_numbers() == key.public_key().public_numbers()


# -- encryption (OpenDHT's PublicKey::encrypt layout) -----------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 245, 246, 1000, 60_000])
def test_encrypt_bytes_layout_and_round_trip(identity: Identity, size: int) -> None:
    data = secrets.token_bytes(size)
    cypher = crypto.encrypt_bytes(identity.public_key, data)
    block = identity.public_key.bits // 8  # 256 for 2048 bits: one block carries at most 245 bytes
    if size <= block - 11:
        assert len(cypher) == block
        assert identity.private_key.decrypt(cypher, padding.PKCS1v15()) == data
    else:  # an RSA block with an AES-256 key, then IV (12) || ciphertext || tag (16)
        assert len(cypher) == block + 12 + size + 16
        assert len(identity.private_key.decrypt(cypher[:block], padding.PKCS1v15())) == 32
    assert crypto.decrypt_bytes(identity.private_key, cypher) == data


def test_decrypt_bytes_refuses_what_is_not_for_us(identity: Identity, other: Identity) -> None:
    long = crypto.encrypt_bytes(identity.public_key, b"x" * 1000)
    short = crypto.encrypt_bytes(identity.public_key, b"short")
    altered = bytearray(long)
    altered[-20] ^= 1
    for cypher in (long[:255], long[:-1], bytes(altered), long[:256] + b"\0" * 20):
        with pytest.raises(CryptoError):
            crypto.decrypt_bytes(identity.private_key, cypher)
    for cypher in (long, short):  # another key: refused, or (implicit rejection) garbage caught later
        with contextlib.suppress(CryptoError):
            assert crypto.decrypt_bytes(other.private_key, cypher) not in (b"x" * 1000, b"short")


def test_encrypted_values_round_trip_and_are_checked(identity: Identity, other: Identity) -> None:
    value = Value(b"secret", id=9, utype="text/plain", prio=1, push_type="call")
    sealed = identity.encrypt_value(value, other.public_key)
    assert (sealed.id, sealed.data, sealed.owner, sealed.prio, sealed.push_type) == (9, b"", None, 1, "call")
    assert sealed.to_wire()["dat"] == sealed.cypher
    opened = other.decrypt_value(sealed, signature.verify)
    assert (opened.data, opened.utype, opened.owner, opened.recipient) == (
        b"secret",
        "text/plain",
        identity.public_key.der,
        other.id,
    )
    assert signature.verify(opened) and (opened.prio, opened.push_type) == (1, "call")
    with pytest.raises(CryptoError):  # not for us
        identity.decrypt_value(sealed, signature.verify)
    with pytest.raises(ValueError):
        identity.encrypt_value(sealed, other.public_key)

    # Encrypted for us but addressed ("to") to someone else, or with a bad signature: refused.
    misaddressed = identity.sign_value(replace(value, recipient=bytes(identity.id)))
    plain = crypto.packb(misaddressed.to_wire()["dat"])
    with pytest.raises(CryptoError, match="another recipient"):
        other.decrypt_value(
            Value(id=9, cypher=crypto.encrypt_bytes(other.public_key, plain)), signature.verify
        )
    forged = replace(identity.sign_value(replace(value, recipient=bytes(other.id))), data=b"forged")
    plain = crypto.packb(forged.to_wire()["dat"])
    with pytest.raises(CryptoError, match="signature"):
        other.decrypt_value(
            Value(id=9, cypher=crypto.encrypt_bytes(other.public_key, plain)), signature.verify
        )
    for garbage in (b"\xc1", crypto.packb({"body": {"data": b"x", "type": 0}})):  # not msgpack; unsigned
        with pytest.raises(CryptoError):
            other.decrypt_value(
                Value(id=9, cypher=crypto.encrypt_bytes(other.public_key, garbage)), signature.verify
            )
