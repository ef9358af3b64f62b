"""A node's cryptographic identity, as OpenDHT's ``crypto::Identity``: an RSA key and its X.509 certificate.

:meth:`Identity.generate` makes what OpenDHT's ``generateIdentity`` makes without a CA: an RSA key with the
public exponent 65537 and a self-signed version 3 certificate whose subject (and issuer) is the common name
``name`` then the user id ``UID`` = the key id in lowercase hex (PrintableString, or UTF8String for a name
with characters outside that set), a random positive 63-bit serial, a validity from now to 3650 days later,
the extensions subject key identifier (the key id, not critical), basic constraints ``CA:TRUE`` (critical)
and key usage ``keyCertSign, cRLSign`` (critical), signed with SHA-256 for keys of up to 3072 bits and
SHA-384 above (GnuTLS's preferred hash for the key size).

A public key is known by two ids: :attr:`PublicKey.id` (OpenDHT's ``InfoHash`` key id), SHA-1 of the DER
SubjectPublicKeyInfo, and :attr:`PublicKey.long_id` (``PkId``), SHA-256 of the same bytes.

Values are signed with RSA PKCS#1 v1.5 over SHA-512 of :meth:`trio_dht.value.Value.signed_bytes`, the bytes
:mod:`trio_dht.signature` verifies. Keys are RSA of 2048 to 4096 bits with e = 65537; anything else is a
:class:`CryptoError`, and so is a file that is not a key or certificate, or is larger than
:data:`MAX_PEM_BYTES`. Files are PEM: the private key as PKCS#8 (encrypted with a password, PBES2 with
AES-256), the certificate as its chain, the node's own certificate first, as OpenDHT's ``saveIdentity``.

A value is encrypted for one recipient as OpenDHT's ``putEncrypted`` does it (:func:`encrypt_value`):
its ``to`` is set to the recipient's key id, it is signed, and its ``dat`` map (``body`` and ``sig``) is
packed and encrypted with the recipient's RSA key (:func:`encrypt_bytes`); what travels is the id, that
cypher and the push hints. :func:`decrypt_value` undoes it and checks the ``to`` and the signature.

This module needs the ``cryptography`` package (the zipapp carries it for the Python that built it).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from trio_dht import purecrypto
from trio_dht.infohash import InfoHash
from trio_dht.small_files import FileTooLarge, read_small_file
from trio_dht.value import InvalidValue, Value
from trio_dht.wire.msgpack_codec import packb, unpackb

RSA_MIN_BITS = 2048
RSA_MAX_BITS = purecrypto.RSA_MAX_MODULUS_BITS
RSA_PUBLIC_EXPONENT = purecrypto.RSA_PUBLIC_EXPONENT
DEFAULT_BITS = 4096
"""The key size OpenDHT's ``generateIdentity`` uses by default."""
CERTIFICATE_VALIDITY = datetime.timedelta(days=10 * 365)
MAX_PEM_BYTES = 64 * 1024
"""The largest key or certificate file read (a 4096-bit key is about 3.3 KB of PEM, a certificate 2 KB)."""
MAX_NAME_CHARS = 64
"""The most characters in a certificate's common name (X.509's upper bound)."""
MAX_SEQ = 0xFFFF
"""A signed value's ``seq`` is a uint16."""
RSA_PADDING_BYTES = 11
"""PKCS#1 v1.5 encryption padding: a block of k bytes carries at most k - 11 bytes."""
GCM_IV_BYTES = 12
GCM_TAG_BYTES = 16

_PRINTABLE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 ()+,-./:=?")
"""The characters GnuTLS writes as a PrintableString (no apostrophe); a name with any other is UTF8String."""


class CryptoError(ValueError):
    """A key, certificate or file this module refuses; the message says why."""


def _check_rsa(key: rsa.RSAPublicKey, what: str) -> None:
    bits, exponent = key.key_size, key.public_numbers().e
    if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
        raise CryptoError(f"{what}: a {bits}-bit RSA key (keys are {RSA_MIN_BITS} to {RSA_MAX_BITS} bits)")
    if exponent != RSA_PUBLIC_EXPONENT:
        raise CryptoError(f"{what}: RSA public exponent {exponent} (only {RSA_PUBLIC_EXPONENT} is accepted)")


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An RSA public key as OpenDHT carries it in a signed value's ``owner``: DER SubjectPublicKeyInfo."""

    der: bytes

    @classmethod
    def from_der(cls, der: bytes) -> PublicKey:
        """The key of a DER SubjectPublicKeyInfo, re-encoded canonically; :class:`CryptoError` unless it is
        an RSA key of 2048 to 4096 bits with e = 65537 (the size and exponent are read before any
        arithmetic)."""
        try:
            purecrypto.rsa_public_key_from_spki(der, RSA_MAX_BITS)
            key = serialization.load_der_public_key(der)
        except ValueError as exc:
            raise CryptoError(f"not an acceptable RSA public key: {exc}") from None
        assert isinstance(key, rsa.RSAPublicKey)  # the parse above accepts rsaEncryption only
        return cls._of(key)

    @classmethod
    def _of(cls, key: rsa.RSAPublicKey, what: str = "public key") -> PublicKey:
        _check_rsa(key, what)
        return cls(
            key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    @property
    def id(self) -> InfoHash:
        """The key id: SHA-1 of the DER SubjectPublicKeyInfo (what a value's ``owner`` is known by)."""
        return InfoHash(hashlib.sha1(self.der).digest())

    @property
    def long_id(self) -> bytes:
        """The long key id: SHA-256 of the DER SubjectPublicKeyInfo (32 bytes)."""
        return hashlib.sha256(self.der).digest()

    @property
    def pem(self) -> bytes:
        return self.key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def bits(self) -> int:
        return self.key().key_size

    def key(self) -> rsa.RSAPublicKey:
        """The ``cryptography`` key object."""
        key = serialization.load_der_public_key(self.der)
        assert isinstance(key, rsa.RSAPublicKey)
        return key


class Certificate:
    """An X.509 certificate and the certificates of its issuers (OpenDHT packs them as one PEM chain)."""

    def __init__(self, cert: x509.Certificate, issuers: Iterable[x509.Certificate] = ()) -> None:
        self.x509 = cert
        self.issuers = tuple(issuers)
        try:
            key = cert.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:  # e.g. an RSA-OAEP or RSA-PSS key
            raise CryptoError(f"certificate: a key that cannot be read ({exc})") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise CryptoError(f"certificate: not an RSA key ({type(key).__name__})")
        self.public_key = PublicKey._of(key, "certificate")

    @classmethod
    def from_pem(cls, data: bytes) -> Certificate:
        """The first certificate of a PEM chain, the rest as its issuers; :class:`CryptoError` otherwise."""
        if len(data) > MAX_PEM_BYTES:
            raise CryptoError(f"certificate: more than {MAX_PEM_BYTES} bytes")
        try:
            with warnings.catch_warnings():
                # OpenDHT 2.x writes the serial as a little-endian int64: half its certificates have a
                # negative one, which cryptography warns about.
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise CryptoError(f"certificate: not a PEM certificate ({exc})") from None
        return cls(certs[0], certs[1:])

    @classmethod
    def from_der(cls, data: bytes) -> Certificate:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)  # as in from_pem
                cert = x509.load_der_x509_certificate(data)
        except ValueError as exc:
            raise CryptoError(f"certificate: not a DER certificate ({exc})") from None
        return cls(cert)

    @property
    def der(self) -> bytes:
        """This certificate alone, DER."""
        return self.x509.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        """This certificate then its issuers, PEM (what OpenDHT announces and saves)."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.x509, *self.issuers))

    @property
    def name(self) -> str:
        """The subject's common name ("" if it has none)."""
        names = self.x509.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else ""

    @property
    def id(self) -> InfoHash:
        return self.public_key.id

    @property
    def long_id(self) -> bytes:
        return self.public_key.long_id


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return read_small_file(path, MAX_PEM_BYTES)
    except OSError as exc:
        raise CryptoError(f"{what} {os.fspath(path)!r}: {exc.strerror or exc}") from None
    except FileTooLarge as exc:
        raise CryptoError(f"{what} {os.fspath(path)!r}: {exc}") from None


def _write(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    """Write ``data`` to a temporary file of this mode beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)  # whatever the umask
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_private_key(data: bytes, password: str | bytes | None = None) -> rsa.RSAPrivateKey:
    """An RSA private key from PEM (PKCS#8 or PKCS#1, encrypted if ``password``); :class:`CryptoError`
    unless it is one of 2048 to 4096 bits with e = 65537. The size is checked before the key's own
    consistency checks run."""
    if isinstance(password, str):
        password = password.encode()
    try:
        key = serialization.load_pem_private_key(data, password or None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"private key: not a PEM private key, or a wrong password ({exc})") from None
    except UnsupportedAlgorithm as exc:
        raise CryptoError(f"private key: a kind of key that cannot be read ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CryptoError(f"private key: not an RSA key ({type(key).__name__})")
    _check_rsa(key.public_key(), "private key")
    try:
        return key.private_numbers().private_key()  # now with the consistency checks
    except ValueError as exc:
        raise CryptoError(f"private key: inconsistent RSA key ({exc})") from None


def sign_bytes(private_key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    """RSA PKCS#1 v1.5 signature of ``data`` with SHA-512, as OpenDHT's ``PrivateKey::sign``."""
    return private_key.sign(data, padding.PKCS1v15(), hashes.SHA512())


def sign_value(private_key: rsa.RSAPrivateKey, value: Value, previous: Iterable[Value] = ()) -> Value:
    """A copy of ``value`` owned and signed by ``private_key``, as OpenDHT's ``putSigned`` signs it.

    Its ``seq`` is its own, or one more than the highest of the ``previous`` values (those already on the
    network or announced) with the same id and owner, whichever is larger; ValueError for an encrypted value
    or a seq past 65535.
    """
    if value.cypher:
        raise ValueError("an encrypted value cannot be signed")
    owner = PublicKey._of(private_key.public_key()).der
    seq = value.seq
    for old in previous:
        if old.id == value.id and old.owner == owner and old.seq >= seq:
            seq = old.seq + 1
    if seq > MAX_SEQ:
        raise ValueError(f"seq {seq} does not fit a uint16: the value can no longer be edited")
    unsigned = replace(value, owner=owner, seq=seq, signature=b"", _packed=None)
    return replace(unsigned, signature=sign_bytes(private_key, unsigned.signed_bytes()))


def encrypt_bytes(public_key: PublicKey, data: bytes) -> bytes:
    """``data`` encrypted for ``public_key`` as OpenDHT's ``PublicKey::encrypt``.

    With k the modulus size in bytes: up to k - 11 bytes is one RSA PKCS#1 v1.5 block of k bytes. Anything
    longer is a block holding a random AES key (the largest of 32, 24 or 16 bytes that fits), followed by
    IV (12 bytes) || AES-GCM ciphertext || tag (16 bytes), with no associated data.
    """
    block = public_key.bits // 8
    room = block - RSA_PADDING_BYTES
    if len(data) <= room:
        return public_key.key().encrypt(data, padding.PKCS1v15())
    aes_key = secrets.token_bytes(next(size for size in (32, 24, 16) if size <= room))
    iv = secrets.token_bytes(GCM_IV_BYTES)
    head = public_key.key().encrypt(aes_key, padding.PKCS1v15())
    return head + iv + AESGCM(aes_key).encrypt(iv, data, None)


def decrypt_bytes(private_key: rsa.RSAPrivateKey, cypher: bytes) -> bytes:
    """What :func:`encrypt_bytes` encrypted for ``private_key``'s public key; :class:`CryptoError` for
    anything else (too short, not for this key, altered)."""
    block = private_key.key_size // 8
    if len(cypher) < block:
        raise CryptoError(f"a cypher is at least {block} bytes, not {len(cypher)}")
    try:
        # cryptography may answer bad PKCS#1 v1.5 padding with random bytes instead of an error (the
        # "implicit rejection" against timing attacks): the GCM tag, or parsing the plaintext, catches it.
        head = private_key.decrypt(cypher[:block], padding.PKCS1v15())
    except ValueError:
        raise CryptoError("the cypher is not for this key") from None
    if len(cypher) == block:
        return head
    if len(head) not in (16, 24, 32) or len(cypher) < block + GCM_IV_BYTES + GCM_TAG_BYTES:
        raise CryptoError("the cypher is not for this key")
    iv, sealed = cypher[block : block + GCM_IV_BYTES], cypher[block + GCM_IV_BYTES :]
    try:
        return AESGCM(head).decrypt(iv, sealed, None)
    except Exception:  # cryptography's InvalidTag
        raise CryptoError("the cypher is not for this key, or was altered") from None


def encrypt_value(private_key: rsa.RSAPrivateKey, value: Value, recipient: PublicKey) -> Value:
    """``value`` signed by ``private_key`` for ``recipient`` and encrypted for it, as OpenDHT's
    ``putEncrypted``: the copy that travels holds only the id, the cypher and the push hints (``prio``,
    ``push_type``, which are not encrypted). ValueError for a value already encrypted."""
    if value.cypher:
        raise ValueError("the value is already encrypted")
    signed = sign_value(private_key, replace(value, recipient=bytes(recipient.id), _packed=None))
    plain = packb(signed.to_wire()["dat"])
    return Value(
        id=value.id, cypher=encrypt_bytes(recipient, plain), prio=value.prio, push_type=value.push_type
    )


def decrypt_value(private_key: rsa.RSAPrivateKey, value: Value, verify: Callable[[Value], bool]) -> Value:
    """The value inside ``value``'s cypher, for ``private_key``'s public key, as OpenDHT's ``SecureDht``
    decrypts it: its ``to`` must be that key's id and ``verify`` must accept its signature. Anything else
    is a :class:`CryptoError`."""
    plain = decrypt_bytes(private_key, value.cypher)
    try:
        inner = Value.from_wire({"id": value.id, "dat": unpackb(plain)})
    except (InvalidValue, ValueError) as exc:
        raise CryptoError(f"the decrypted value is not a value ({exc})") from None
    if inner.cypher or not inner.is_signed:
        raise CryptoError("the decrypted value is not signed")
    if inner.recipient != PublicKey._of(private_key.public_key()).id:
        raise CryptoError("the decrypted value is for another recipient")
    if not verify(inner):
        raise CryptoError("the decrypted value's signature is not valid")
    inner.prio, inner.push_type = value.prio, value.push_type
    return inner


def _name_attribute(oid: x509.ObjectIdentifier, text: str) -> x509.NameAttribute:
    kind = _ASN1Type.PrintableString if set(text) <= _PRINTABLE else _ASN1Type.UTF8String
    return x509.NameAttribute(oid, text, _type=kind)


def self_signed_certificate(private_key: rsa.RSAPrivateKey, name: str) -> x509.Certificate:
    """The certificate OpenDHT's ``Certificate::generate`` makes for a key without a CA (see the module)."""
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise CryptoError(f"a certificate name is 1 to {MAX_NAME_CHARS} characters, not {len(name)}")
    public = PublicKey._of(private_key.public_key())
    subject = x509.Name(
        [_name_attribute(NameOID.COMMON_NAME, name), _name_attribute(NameOID.USER_ID, public.id.hex())]
    )
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private_key.public_key())
        .serial_number(secrets.randbelow(2**63 - 1) + 1)
        .not_valid_before(now)
        .not_valid_after(now + CERTIFICATE_VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier(bytes(public.id)), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    digest = hashes.SHA256() if private_key.key_size <= 3072 else hashes.SHA384()
    return builder.sign(private_key, digest)


class Identity:
    """A private key and its certificate (OpenDHT's ``crypto::Identity``)."""

    def __init__(self, private_key: rsa.RSAPrivateKey, certificate: Certificate) -> None:
        _check_rsa(private_key.public_key(), "private key")
        if PublicKey._of(private_key.public_key()) != certificate.public_key:
            raise CryptoError("the private key is not the certificate's")
        self.private_key = private_key
        self.certificate = certificate
        self.public_key = certificate.public_key

    @classmethod
    def generate(cls, name: str = "trio_dht", bits: int = DEFAULT_BITS) -> Identity:
        """A new RSA key of ``bits`` and its self-signed certificate with common name ``name``."""
        if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
            raise CryptoError(f"RSA keys are {RSA_MIN_BITS} to {RSA_MAX_BITS} bits, not {bits}")
        if not 1 <= len(name) <= MAX_NAME_CHARS:  # before the slow key generation
            raise CryptoError(f"a certificate name is 1 to {MAX_NAME_CHARS} characters, not {len(name)}")
        key = rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=bits)
        return cls(key, Certificate(self_signed_certificate(key, name)))

    @classmethod
    def load(
        cls,
        key_path: str | os.PathLike[str],
        cert_path: str | os.PathLike[str],
        password: str | bytes | None = None,
    ) -> Identity:
        """The identity in a PEM private key file and a PEM certificate (chain) file."""
        certificate = Certificate.from_pem(_read(cert_path, "certificate"))
        return cls(load_private_key(_read(key_path, "private key"), password), certificate)

    def save(
        self,
        key_path: str | os.PathLike[str],
        cert_path: str | os.PathLike[str],
        password: str | bytes | None = None,
    ) -> None:
        """Write the private key (PKCS#8 PEM, mode 0600, encrypted with ``password`` if given) and the
        certificate chain (PEM, mode 0644)."""
        if isinstance(password, str):
            password = password.encode()
        encryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        key_pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        _write(key_path, key_pem, 0o600)
        _write(cert_path, self.certificate.pem, 0o644)

    @property
    def id(self) -> InfoHash:
        """The public key's id."""
        return self.public_key.id

    def sign(self, data: bytes) -> bytes:
        """RSA PKCS#1 v1.5 signature of ``data`` with SHA-512."""
        return sign_bytes(self.private_key, data)

    def sign_value(self, value: Value, previous: Iterable[Value] = ()) -> Value:
        """``value`` owned and signed by this identity (see :func:`sign_value`)."""
        return sign_value(self.private_key, value, previous)

    def encrypt_value(self, value: Value, recipient: PublicKey) -> Value:
        """``value`` signed by this identity and encrypted for ``recipient`` (see :func:`encrypt_value`)."""
        return encrypt_value(self.private_key, value, recipient)

    def decrypt_value(self, value: Value, verify: Callable[[Value], bool]) -> Value:
        """The value encrypted for this identity in ``value`` (see :func:`decrypt_value`)."""
        return decrypt_value(self.private_key, value, verify)

    def __repr__(self) -> str:
        return f"<Identity {self.certificate.name!r} {self.id.hex()} ({self.public_key.bits} bits)>"
