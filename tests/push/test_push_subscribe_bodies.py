"""SUBSCRIBE / UNSUBSCRIBE bodies in both dialects, and the errors for bad ones."""

import pytest

from trio_dht.push.payloads import Dialect, Platform
from trio_dht.push.subscribe_bodies import BadRequest, parse_subscribe, parse_unsubscribe


def test_current_dialect_as_the_cpp_client_sends_it():
    body = b'{"client_id":"dhtnode","key":"tok","platform":"android","session_id":"q7T(#a.Z","topic":""} '
    r = parse_subscribe(body)
    assert (r.dialect, r.token, r.platform, r.client_id, r.session_id, r.refresh) == (
        Dialect.CURRENT, "tok", Platform.ANDROID, "dhtnode", "q7T(#a.Z", False,
    )  # fmt: skip
    assert parse_subscribe(b'{"key":"t","refresh":true}').refresh


def test_seed_dialect_and_lenient_fields():
    r = parse_subscribe(b'{"key": 123, "callback_id": 5, "platform": "ios"}')
    assert (r.dialect, r.token, r.client_id, r.platform, r.session_id) == (
        Dialect.SEED,
        "123",
        "5",
        Platform.IOS,
        None,
    )
    assert parse_subscribe(b'{"key":"t","callback_id":"c","client_id":"x"}').dialect is Dialect.CURRENT
    assert parse_subscribe(b'{"key":"t","platform":"foo"}').platform is Platform.NONE
    assert parse_subscribe(b'{"key":"t"}garbage').token == "t"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "Incorrect JSON"),
        (b"{", "Incorrect JSON"),
        (b"[1]", "Incorrect JSON"),
        (b"\xff", "Incorrect JSON"),
        (b"{}", "No token"),
        (b'{"key":""}', "No token"),
        (b'{"key":"t","refresh":1}', "Bad field refresh"),
        (b'{"key":"t","platform":2}', "Bad field platform"),
        (b'{"key":"' + b"x" * 1001 + b'"}', "Field key too long"),
    ],
)
def test_bad_subscribe_bodies_are_400_with_json(body, message):
    with pytest.raises(BadRequest) as info:
        parse_subscribe(body)
    assert info.value.status == 400
    assert info.value.body == b'{"err":"' + message.encode() + b'"}\n'


def test_unsubscribe_both_dialects():
    r = parse_unsubscribe(b'{"client_id":"c","key":"t"}')
    assert (r.dialect, r.client_id, r.sub_token) == (Dialect.CURRENT, "c", None)
    r = parse_unsubscribe(b'{"key":"t","token":42,"callback_id":"cb"}')
    assert (r.dialect, r.client_id, r.sub_token) == (Dialect.SEED, "cb", 42)
    assert parse_unsubscribe(b'{"key":"t","token":"42"}').sub_token == 42
    with pytest.raises(BadRequest, match="No token"):
        parse_unsubscribe(b'{"client_id":"c"}')
    with pytest.raises(BadRequest, match="Bad field token"):
        parse_unsubscribe(b'{"key":"t","token":"x"}')
