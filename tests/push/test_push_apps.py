"""AppGateways: each push goes through the gateway of the app its platform and topic pick."""

from __future__ import annotations

from trio_dht.config_file import AppKind, AppSpec, GorushCredentials
from trio_dht.push.apps import AppGateways
from trio_dht.push.payloads import Platform, Push, PushKind


class Named:
    def __init__(self, name: str) -> None:
        self.name = name


def app(app_id: str, platforms: tuple[str, ...], topics: tuple[str, ...] = ()) -> AppSpec:
    return AppSpec(app_id, AppKind.GORUSH, platforms, topics, GorushCredentials("http://127.0.0.1:9", ""))


def push(platform: Platform, topic: str = "") -> Push:
    return Push(1, PushKind.VALUES, "token", platform, topic, {}, True)


def test_routes_by_platform_then_topic() -> None:
    apps = [
        app("voip", ("ios",), ("org.example.voip",)),
        app("ios", ("ios",)),
        app("android-b", ("android",), ("org.example.b",)),
        app("android", ("android",)),
        app("unused", ("android",), ("org.example.c",)),
    ]
    gateways = {a.id: Named(a.id) for a in apps if a.id != "unused"}
    unifiedpush = Named("unifiedpush")
    router = AppGateways(apps, gateways, unifiedpush)
    assert [g.name for g in router.gateways] == ["unifiedpush", "voip", "ios", "android-b", "android"]
    chosen = {
        (Platform.IOS, "org.example.voip"): "voip",
        (Platform.IOS, "org.example.other"): "ios",
        (Platform.NONE, ""): "ios",  # clients without a platform are iOS's, as OpenDHT has it
        (Platform.ANDROID, "org.example.b"): "android-b",
        (Platform.ANDROID, ""): "android",
        (Platform.ANDROID, "org.example.c"): "android",  # an app without a gateway is skipped
        (Platform.UNIFIEDPUSH, "p256dh|auth"): "unifiedpush",
    }
    for (platform, topic), name in chosen.items():
        assert router.select(push(platform, topic)).name == name


def test_a_push_no_app_takes_has_no_gateway() -> None:
    router = AppGateways([app("ios", ("ios",), ("org.example.app",))], {"ios": Named("ios")}, Named("up"))
    assert router.select(push(Platform.ANDROID)) is None
    assert router.select(push(Platform.IOS, "org.example.other")) is None
