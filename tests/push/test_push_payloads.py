"""Push payloads and gateway bodies, exactly as OpenDHT's proxy puts them on the wire."""

import json

from trio_dht.infohash import InfoHash
from trio_dht.push import webpush_crypto
from trio_dht.push.gateway import Outcome, parse_retry_after
from trio_dht.push.gorush import GorushGateway, classify_failure, gorush_notification
from trio_dht.push.payloads import Dialect, Platform, Push, PushKind, encode_data, timeout_data, values_data
from trio_dht.push.unifiedpush import webpush_request

KEY = InfoHash.from_hex("2244761ef7331398c85b98fe1d9db610db440619")
NOW = 1795624490.210


def compact(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def push(platform, data, high=True, topic="", token="devtoken", kind=PushKind.VALUES):
    return Push(7, kind, token, platform, topic, data, high)


def current(**kw):
    return values_data(Dialect.CURRENT, key_hex=KEY.hex(), sub_token=7, **kw)


def test_values_data_current_dialect_matches_the_reference():
    data = current(client_id="c1", session_id="", t_ms=1795624490210)
    assert encode_data(data) == (
        b'{"key":"2244761ef7331398c85b98fe1d9db610db440619","s":"","t":1795624490210,"to":"c1"}'
    )
    exp = current(client_id="ce", session_id="", t_ms=1, expired_id=500)
    assert exp["exp"] == "500"


def test_timeout_and_seed_payloads():
    assert timeout_data(Dialect.CURRENT, key_hex=KEY.hex(), client_id="c", session_id="s", sub_token=9) == {
        "s": "s",
        "timeout": KEY.hex(),
        "to": "c",
    }
    assert values_data(
        Dialect.SEED, key_hex=KEY.hex(), client_id="cb", session_id="", sub_token=9, t_ms=1
    ) == {"callback_id": "cb", "token": 9}
    assert timeout_data(Dialect.SEED, key_hex=KEY.hex(), client_id="cb", session_id="", sub_token=9) == {
        "callback_id": "cb",
        "timeout": KEY.hex(),
        "token": 9,
    }


def test_android_body_is_the_fcm_v1_layout():
    data = current(client_id="c1", session_id="", t_ms=1795624490210)
    body = GorushGateway(None, "http://gw").request_body([push(Platform.ANDROID, data)], NOW)
    assert compact(body) == (
        b'{"notifications":[{"android":{"priority":"high","ttl":"86400s"},'
        b'"data":{"key":"2244761ef7331398c85b98fe1d9db610db440619","s":"","t":1795624490210,"to":"c1"},'
        b'"platform":2,"tokens":["devtoken"]}]}'
    )
    normal = gorush_notification(push(Platform.ANDROID, data, high=False), bundle_id="b", now_wall=NOW)
    assert normal["android"]["priority"] == "normal"
    assert "topic" not in normal


def test_ios_alert_and_background_match_the_reference():
    data = {"key": "cdbfeb01f0ae4b6daa740ce0124e82e5fceda7d8", "s": "s1", "t": 1795624501478, "to": "ci"}
    alert = gorush_notification(
        push(Platform.IOS, data, topic="com.example.ios.voip", token="iostoken"),
        bundle_id="x",
        now_wall=1795624501,
    )
    assert compact({"notifications": [alert]}) == (
        b'{"notifications":[{"alert":{"title":"hello"},"data":{"key":"cdbfeb01f0ae4b6daa740ce0124e82e5fceda7d8",'
        b'"s":"s1","t":1795624501478,"to":"ci"},"expiration":1795710901,"mutable_content":true,"platform":1,'
        b'"priority":"high","push_type":"alert","tokens":["iostoken"],"topic":"com.example.ios.voip"}]}'
    )
    background = gorush_notification(
        push(Platform.IOS, data, high=False, topic="com.example.ios.voip", token="iostoken"),
        bundle_id="x",
        now_wall=1795624502,
    )
    assert compact({"notifications": [background]}) == (
        b'{"notifications":[{"content_available":true,"data":{"key":"cdbfeb01f0ae4b6daa740ce0124e82e5fceda7d8",'
        b'"s":"s1","t":1795624501478,"to":"ci"},"expiration":1795710902,"platform":1,"priority":"normal",'
        b'"push_type":"background","tokens":["iostoken"],"topic":"com.example.ios.voip"}]}'
    )


def test_ios_timeout_is_an_alert_and_topic_falls_back_to_bundle_id():
    data = {"s": "s", "timeout": KEY.hex(), "to": "c"}
    note = gorush_notification(
        push(Platform.IOS, data, high=False, kind=PushKind.TIMEOUT), bundle_id="b.id", now_wall=0
    )
    assert note["push_type"] == "alert" and note["priority"] == "high" and note["topic"] == "b.id"
    bare = gorush_notification(push(Platform.IOS, data, high=False), bundle_id="", now_wall=0)
    assert "topic" not in bare


def test_unknown_platform_is_sent_as_ios_like_opendht():
    data = current(client_id="c", session_id="", t_ms=1)
    note = gorush_notification(push(Platform.NONE, data), bundle_id="com.example.app", now_wall=0)
    assert note["platform"] == 1 and note["topic"] == "com.example.app"


def test_unifiedpush_plain_and_encrypted_requests():
    data = {"key": "a828", "s": "su", "t": 1795624641716, "to": "cu"}
    headers, body = webpush_request(push(Platform.UNIFIEDPUSH, data))
    assert headers == {"TTL": "86400", "Urgency": "high", "Content-Type": "application/json"}
    assert body == b'{"key":"a828","s":"su","t":1795624641716,"to":"cu"}'
    ua = webpush_crypto.generate_private_key()
    auth = bytes(range(16))
    topic = webpush_crypto.b64url(webpush_crypto.public_bytes(ua)) + "|" + webpush_crypto.b64url(auth)
    headers, body = webpush_request(push(Platform.UNIFIEDPUSH, data, high=False, topic=topic))
    assert headers["Content-Encoding"] == "aes128gcm" and headers["Urgency"] == "normal"
    assert len(body) <= 4096
    assert webpush_crypto.decrypt(body, ua, auth) == encode_data(data)


def test_merging_keeps_exp_only_when_both_name_the_same_value():
    a = push(Platform.ANDROID, {"key": "k", "t": 1, "exp": "5"}, high=False)
    b = push(Platform.ANDROID, {"key": "k", "t": 2, "exp": "6"}, high=False)
    c = push(Platform.ANDROID, {"key": "k", "t": 3}, high=True)
    assert a.merged_with(b).data == {"key": "k", "t": 2}
    assert a.merged_with(a).data["exp"] == "5"
    assert c.merged_with(b).data == {"key": "k", "t": 2} and c.merged_with(b).high_priority


def test_gorush_failure_classes_and_retry_after():
    assert classify_failure("Unregistered") is Outcome.TOKEN_GONE
    assert classify_failure("Requested entity was not found.") is Outcome.TOKEN_GONE
    assert (
        classify_failure("The registration token is not a valid FCM registration token") is Outcome.TOKEN_GONE
    )
    assert classify_failure("TooManyRequests") is Outcome.RETRY
    assert classify_failure("ExpiredProviderToken") is Outcome.DROPPED
    assert parse_retry_after("30", 0) == 30
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:00 GMT", 0) == 60
    assert parse_retry_after("99999999", 0) == 3600
    assert parse_retry_after("soon", 0) is None
