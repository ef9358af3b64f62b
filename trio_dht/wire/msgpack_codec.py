"""msgpack as OpenDHT uses it, in one place: ``packb`` and ``unpackb``. Every module of trio_dht that packs
or unpacks msgpack goes through these two.

With msgpack's C extension (a pip install, or the zipapp's copy: ``zipapp/native.py``) both are msgpack's
own. Without it they are the compact pure-Python codec below, which does only what the wire needs: BIN for
bytes, STR for text (invalid UTF-8 kept with ``surrogateescape``), integer map keys allowed, no ext types, no
timestamps. That is 2 to 3 times faster than msgpack's own pure-Python ``msgpack.fallback`` on the node's
messages (decoding a ping, get or put request, encoding a get reply with values), so the zipapp on an
interpreter without the C extension uses it. Both raise ``ValueError`` (or a subclass) on malformed input.
``MSGPACK_PUREPYTHON=1`` selects the pure codec even where C is available.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

import msgpack

__all__ = ["PURE", "packb", "pure_packb", "pure_unpackb", "unpackb"]


class PackError(ValueError):
    """An object that msgpack cannot represent (as OpenDHT uses it)."""


class UnpackError(ValueError):
    """Bytes that are not one complete msgpack object."""


# -- decoding ------------------------------------------------------------------------

_unpack_from = struct.unpack_from
_Reader = Callable[[bytes, int, int], tuple[Any, int]]


def _fixint(data: bytes, i: int, b: int) -> tuple[Any, int]:
    return b, i


def _negfixint(data: bytes, i: int, b: int) -> tuple[Any, int]:
    return b - 0x100, i


def _str(data: bytes, i: int, n: int) -> tuple[Any, int]:
    end = i + n
    if end > len(data):
        raise UnpackError("truncated str")
    return data[i:end].decode("utf-8", "surrogateescape"), end


def _bin(data: bytes, i: int, n: int) -> tuple[Any, int]:
    end = i + n
    if end > len(data):
        raise UnpackError("truncated bin")
    return data[i:end], end


def _array(data: bytes, i: int, n: int) -> tuple[Any, int]:
    if n > len(data) - i:
        raise UnpackError("array longer than the data")
    out = []
    append = out.append
    for _ in range(n):
        b = data[i]
        item, i = _READERS[b](data, i + 1, b)
        append(item)
    return out, i


def _map(data: bytes, i: int, n: int) -> tuple[Any, int]:
    if 2 * n > len(data) - i:
        raise UnpackError("map longer than the data")
    out = {}
    for _ in range(n):
        b = data[i]
        key, i = _READERS[b](data, i + 1, b)
        if isinstance(key, list | dict):
            raise UnpackError("unhashable map key")
        b = data[i]
        out[key], i = _READERS[b](data, i + 1, b)
    return out, i


def _sized(fmt: str, size: int, then: _Reader) -> _Reader:
    def read(data: bytes, i: int, b: int) -> tuple[Any, int]:
        if i + size > len(data):
            raise UnpackError("truncated length")
        return then(data, i + size, _unpack_from(fmt, data, i)[0])

    return read


def _number(fmt: str, size: int) -> _Reader:
    def read(data: bytes, i: int, b: int) -> tuple[Any, int]:
        if i + size > len(data):
            raise UnpackError("truncated number")
        return _unpack_from(fmt, data, i)[0], i + size

    return read


def _const(value: Any) -> _Reader:
    def read(data: bytes, i: int, b: int) -> tuple[Any, int]:
        return value, i

    return read


def _invalid(data: bytes, i: int, b: int) -> tuple[Any, int]:
    raise UnpackError(f"unsupported msgpack byte 0x{b:02x}")


def _build_readers() -> list[_Reader]:
    readers: list[_Reader] = [_invalid] * 256
    for b in range(0x00, 0x80):
        readers[b] = _fixint
    for b in range(0xE0, 0x100):
        readers[b] = _negfixint
    for b in range(0x80, 0x90):
        readers[b] = lambda data, i, b: _map(data, i, b & 0x0F)
    for b in range(0x90, 0xA0):
        readers[b] = lambda data, i, b: _array(data, i, b & 0x0F)
    for b in range(0xA0, 0xC0):
        readers[b] = lambda data, i, b: _str(data, i, b & 0x1F)
    readers[0xC0] = _const(None)
    readers[0xC2] = _const(False)
    readers[0xC3] = _const(True)
    readers[0xC4] = _sized(">B", 1, _bin)
    readers[0xC5] = _sized(">H", 2, _bin)
    readers[0xC6] = _sized(">I", 4, _bin)
    readers[0xCA] = _number(">f", 4)
    readers[0xCB] = _number(">d", 8)
    readers[0xCC] = _number(">B", 1)
    readers[0xCD] = _number(">H", 2)
    readers[0xCE] = _number(">I", 4)
    readers[0xCF] = _number(">Q", 8)
    readers[0xD0] = _number(">b", 1)
    readers[0xD1] = _number(">h", 2)
    readers[0xD2] = _number(">i", 4)
    readers[0xD3] = _number(">q", 8)
    readers[0xD9] = _sized(">B", 1, _str)
    readers[0xDA] = _sized(">H", 2, _str)
    readers[0xDB] = _sized(">I", 4, _str)
    readers[0xDC] = _sized(">H", 2, _array)
    readers[0xDD] = _sized(">I", 4, _array)
    readers[0xDE] = _sized(">H", 2, _map)
    readers[0xDF] = _sized(">I", 4, _map)
    return readers


_READERS = _build_readers()


def pure_unpackb(data: bytes) -> Any:
    """Decode exactly one msgpack object from ``data``."""
    data = bytes(data)
    try:
        b = data[0]
        obj, end = _READERS[b](data, 1, b)
    except IndexError:
        raise UnpackError("truncated data") from None
    except RecursionError:
        raise UnpackError("nested too deeply") from None
    if end != len(data):
        raise UnpackError("extra data after the object")
    return obj


# -- encoding ------------------------------------------------------------------------

_pack = struct.pack


def _pack_str(obj: str, out: list[bytes]) -> None:
    raw = obj.encode("utf-8", "surrogateescape")
    n = len(raw)
    if n < 32:
        out.append(_FIXSTR[n])
    elif n < 0x100:
        out.append(bytes((0xD9, n)))
    elif n < 0x10000:
        out.append(_pack(">BH", 0xDA, n))
    else:
        out.append(_pack(">BI", 0xDB, n))
    out.append(raw)


def _pack_bin(obj: bytes, out: list[bytes]) -> None:
    n = len(obj)
    if n < 0x100:
        out.append(bytes((0xC4, n)))
    elif n < 0x10000:
        out.append(_pack(">BH", 0xC5, n))
    else:
        out.append(_pack(">BI", 0xC6, n))
    out.append(bytes(obj))


def _pack_map(obj: dict, out: list[bytes]) -> None:
    n = len(obj)
    if n < 16:
        out.append(_FIXMAP[n])
    elif n < 0x10000:
        out.append(_pack(">BH", 0xDE, n))
    else:
        out.append(_pack(">BI", 0xDF, n))
    for k, v in obj.items():
        _PACKERS.get(type(k), _pack_other)(k, out)
        _PACKERS.get(type(v), _pack_other)(v, out)


def _pack_array(obj: list | tuple, out: list[bytes]) -> None:
    n = len(obj)
    if n < 16:
        out.append(_FIXARRAY[n])
    elif n < 0x10000:
        out.append(_pack(">BH", 0xDC, n))
    else:
        out.append(_pack(">BI", 0xDD, n))
    for v in obj:
        _PACKERS.get(type(v), _pack_other)(v, out)


def _pack_other(obj: Any, out: list[bytes]) -> None:
    """Subclasses (an InfoHash is a bytes), None and floats."""
    if obj is None:
        out.append(b"\xc0")
    elif isinstance(obj, bool):
        out.append(b"\xc3" if obj else b"\xc2")
    elif isinstance(obj, int):
        _pack_int(int(obj), out)
    elif isinstance(obj, str):
        _pack_str(str(obj), out)
    elif isinstance(obj, bytes | bytearray | memoryview):
        _pack_bin(obj, out)
    elif isinstance(obj, dict):
        _pack_map(obj, out)
    elif isinstance(obj, list | tuple):
        _pack_array(obj, out)
    elif isinstance(obj, float):
        out.append(_pack(">Bd", 0xCB, obj))
    else:
        raise PackError(f"cannot pack {type(obj).__name__}")


def _pack_int(n: int, out: list[bytes]) -> None:
    """The smallest form, as msgpack-c (and msgpack-python) choose it."""
    if 0 <= n < 0x80:
        out.append(_FIXINT[n])
    elif -32 <= n < 0:
        out.append(bytes((n & 0xFF,)))
    elif n >= 0:
        if n < 0x100:
            out.append(bytes((0xCC, n)))
        elif n < 0x10000:
            out.append(_pack(">BH", 0xCD, n))
        elif n < 0x100000000:
            out.append(_pack(">BI", 0xCE, n))
        elif n < 0x10000000000000000:
            out.append(_pack(">BQ", 0xCF, n))
        else:
            raise PackError("integer too large")
    elif n >= -0x80:
        out.append(_pack(">Bb", 0xD0, n))
    elif n >= -0x8000:
        out.append(_pack(">Bh", 0xD1, n))
    elif n >= -0x80000000:
        out.append(_pack(">Bi", 0xD2, n))
    elif n >= -0x8000000000000000:
        out.append(_pack(">Bq", 0xD3, n))
    else:
        raise PackError("integer too small")


_FIXINT = [bytes((n,)) for n in range(0x80)]
_FIXSTR = [bytes((0xA0 | n,)) for n in range(32)]
_FIXMAP = [bytes((0x80 | n,)) for n in range(16)]
_FIXARRAY = [bytes((0x90 | n,)) for n in range(16)]
_PACKERS: dict[type, Callable[[Any, list[bytes]], None]] = {
    str: _pack_str,
    int: _pack_int,
    bytes: _pack_bin,
    dict: _pack_map,
    list: _pack_array,
    tuple: _pack_array,
}


def pure_packb(obj: Any) -> bytes:
    """Encode ``obj`` (bytes as BIN, str as STR, ints in their smallest form)."""
    out: list[bytes] = []
    try:
        _PACKERS.get(type(obj), _pack_other)(obj, out)
    except RecursionError:
        raise PackError("nested too deeply") from None
    return b"".join(out)


# -- the codec in use ------------------------------------------------------------------------

try:
    if os.environ.get("MSGPACK_PUREPYTHON"):  # msgpack's own switch: tests run the wire suite both ways
        raise ImportError("pure Python asked for")
    from msgpack import _cmsgpack  # noqa: F401  (present only in msgpack's compiled wheel)
except ImportError:
    PURE = True
    packb: Callable[[Any], bytes] = pure_packb
    unpackb: Callable[[bytes], Any] = pure_unpackb
else:
    PURE = False
    _c_packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    packb = _c_packer.pack

    def unpackb(data: bytes) -> Any:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False, unicode_errors="surrogateescape")
        except ValueError:
            raise
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise UnpackError(f"{type(exc).__name__}: {exc}") from None
