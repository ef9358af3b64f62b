"""The push apps of the configuration as one router: which gateway each push goes through.

Each app (``--config``'s ``[apps.<id>]``, or ``--pushserver``) has its own gateway, named after the app, so
the dispatcher gives each its own lanes, concurrency and counters. A push goes to the app that
:func:`trio_dht.config_file.route` picks for its platform and topic (an iOS bundle id, an Android package);
a UnifiedPush push goes to the UnifiedPush gateway, whose endpoint is in the push's token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from trio_dht.config_file import AppSpec, route
from trio_dht.push.gateway import Gateway
from trio_dht.push.payloads import Platform, Push


class AppGateways:
    """A :class:`~trio_dht.push.dispatcher.GatewayRouter` over the apps' gateways (``by_app``: app id ->
    gateway) and the UnifiedPush one."""

    def __init__(self, apps: Sequence[AppSpec], by_app: Mapping[str, Gateway], unifiedpush: Gateway) -> None:
        self._apps = tuple(app for app in apps if app.id in by_app)
        self._by_app = dict(by_app)
        self._unifiedpush = unifiedpush
        self.gateways: list[Gateway] = [unifiedpush, *self._by_app.values()]

    def select(self, push: Push) -> Gateway | None:
        if push.platform is Platform.UNIFIEDPUSH:
            return self._unifiedpush
        app = route(self._apps, push.platform.value, push.topic)
        return self._by_app[app.id] if app is not None else None
