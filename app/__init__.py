"""Braze Connected Content endpoints over Amplitude's User Profile API.

Only :func:`create_app` lives here, and it imports what it builds when it is called:
gunicorn's master imports :mod:`app.settings` to check the settings before it forks, and
must not import the rest (the HTTP client, Redis, the logging threads) before the gevent
worker has patched the standard library in each worker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    from app.clock import Clock
    from app.settings import Settings


def create_app(
    settings: Settings | None = None,
    environ: Mapping[str, str] | None = None,
    clock: Clock | None = None,
) -> Flask:
    """Build the service from *settings*, else from *environ*, else from ``os.environ``."""
    import logging

    from flask import Flask

    from app.clock import SYSTEM_CLOCK
    from app.errors import register_error_handlers
    from app.extensions import ProxyExtensions
    from app.http.arrival import ArrivalStamp
    from app.http.data import DataRoutes
    from app.http.forwarded import TrustedForwardedFor
    from app.http.gate import register_gate
    from app.http.middleware import RawPathMiddleware
    from app.http.ops import ops
    from app.http.security import parse_networks
    from app.http.views import v1
    from app.http.webhooks import webhooks
    from app.observability import configure_logging
    from app.settings import load_settings

    settings = settings or load_settings(os.environ if environ is None else environ)
    configure_logging(settings.log_level, settings.log_user_ids)
    app = Flask(__name__, static_folder=None)
    # Every answer is JSON, so no automatic (empty-bodied) OPTIONS responses.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # No redirects (Braze does not follow them, and they would answer in HTML): "//" in a
    # path is an unknown route, not a request to be rewritten.
    app.url_map.merge_slashes = False
    extensions = ProxyExtensions.build(settings, clock=clock or SYSTEM_CLOCK)
    app.extensions["profile_proxy"] = extensions
    register_error_handlers(app)
    register_gate(app)
    app.register_blueprint(ops)
    app.register_blueprint(webhooks)
    if settings.preview_page:
        from app.preview.page import register as register_preview_page

        register_preview_page(app)
    proxies = parse_networks(settings.forwarded_allow_ips)
    # The data routes, answered without Flask (app.http.data); everything else goes on to it.
    wsgi: Any = DataRoutes(v1, extensions, app.wsgi_app)
    if settings.trusted_proxy_count:
        # X-Forwarded-For counts only from FORWARDED_ALLOW_IPS, and only the entries the
        # trusted proxies appended: a client's own entries sit further left and are ignored.
        wsgi = TrustedForwardedFor(wsgi, proxies, settings.trusted_proxy_count)
    # Before anything else: the arrival time, and the raw path Flask routes on.
    app.wsgi_app = RawPathMiddleware(wsgi, ArrivalStamp(extensions.clock, proxies))  # type: ignore[method-assign]
    if settings.demo_mode:
        logging.getLogger(__name__).warning(
            "DEMO MODE: serving simulated Amplitude data from %s", settings.amplitude_api_url
        )
    return app
