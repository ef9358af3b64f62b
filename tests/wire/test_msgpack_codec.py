"""The pure-Python msgpack codec (what the zipapp runs) agrees with msgpack's C extension, byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_dht.wire.msgpack_codec import PackError, UnpackError, pure_packb, pure_unpackb


def c_packb(obj):
    return msgpack.packb(obj, use_bin_type=True)


def c_unpackb(data):
    return msgpack.unpackb(data, raw=False, strict_map_key=False, unicode_errors="surrogateescape")


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.binary(max_size=300)
    | st.text(max_size=300)
    | st.floats(allow_nan=False)
)
objects = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=20)
        | st.dictionaries(st.text(max_size=10) | st.integers(0, 2**32), inner, max_size=20)
    ),
    max_leaves=60,
)


@given(objects)
@settings(max_examples=400)
def test_encoding_matches_the_c_extension(obj) -> None:
    assert pure_packb(obj) == c_packb(obj)
    assert pure_unpackb(c_packb(obj)) == c_unpackb(c_packb(obj))


@pytest.mark.parametrize(
    "obj", [0, 127, 128, -32, -33, 255, 256, 65535, 65536, 2**32, 2**64 - 1, -(2**63), "x" * 31, "x" * 32,
            b"x" * 255, b"x" * 256, b"x" * 65536, list(range(16)), {i: i for i in range(16)}],
)  # fmt: skip
def test_boundaries(obj) -> None:
    assert pure_packb(obj) == c_packb(obj)
    assert pure_unpackb(pure_packb(obj)) == obj


@given(st.binary(max_size=200))
@settings(max_examples=1000)
def test_garbage_raises_only_value_errors(data: bytes) -> None:
    try:
        c_obj = c_unpackb(data)
    except Exception:
        c_obj = UnpackError
    try:
        ours = pure_unpackb(data)
    except ValueError:
        ours = UnpackError
    # Where both accept the bytes, they decode them the same (ext types aside: OpenDHT never sends them).
    if c_obj is not UnpackError and not isinstance(c_obj, msgpack.ExtType) and ours is not UnpackError:
        assert ours == c_obj


def test_truncated_and_trailing_data_are_errors() -> None:
    good = c_packb({"a": [1, 2, b"xyz"], "t": 7})
    for cut in range(len(good)):
        with pytest.raises(UnpackError):
            pure_unpackb(good[:cut])
    with pytest.raises(UnpackError):
        pure_unpackb(good + b"\x00")


def test_unpackable_objects_are_errors() -> None:
    with pytest.raises(PackError):
        pure_packb(object())
    with pytest.raises(PackError):
        pure_packb(2**64)


def test_the_wire_suite_passes_with_the_pure_codec() -> None:
    """tests/wire/test_wire.py again, with the codec the zipapp uses."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MSGPACK_PUREPYTHON": "1"}
    check = "from trio_dht.wire import msgpack_codec; assert msgpack_codec.PURE"
    subprocess.run([sys.executable, "-c", check], check=True, env=env, cwd=root)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/wire/test_wire.py"],
        env=env, cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
