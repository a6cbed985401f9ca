"""Braze Connected Content endpoints over Amplitude's User Profile API."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from flask import Flask

from app.clock import SYSTEM_CLOCK, Clock
from app.errors import register_error_handlers
from app.extensions import ProxyExtensions
from app.http.arrival import ArrivalStamp
from app.http.edge import CachedHitEdge
from app.http.forwarded import TrustedForwardedFor
from app.http.gate import register_gate
from app.http.middleware import RawPathMiddleware
from app.http.security import parse_networks
from app.observability import configure_logging
from app.settings import Settings, load_settings

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    environ: Mapping[str, str] | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> Flask:
    """Build the service from *settings*, else from *environ*, else from ``os.environ``."""
    settings = settings or load_settings(os.environ if environ is None else environ)
    configure_logging(settings.log_level, settings.log_user_ids)
    app = Flask(__name__, static_folder=None)
    # Every answer is JSON, so no automatic (empty-bodied) OPTIONS responses.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # No redirects (Braze does not follow them, and they would answer in HTML): "//" in a
    # path is an unknown route, not a request to be rewritten.
    app.url_map.merge_slashes = False
    app.extensions["profile_proxy"] = ProxyExtensions.build(settings, clock=clock)
    register_error_handlers(app)
    register_gate(app)

    from app.http.ops import ops
    from app.http.views import v1

    app.register_blueprint(ops)
    app.register_blueprint(v1)
    if settings.preview_page:
        from app.preview.page import register as register_preview_page

        register_preview_page(app)
    arrival = ArrivalStamp(clock, parse_networks(settings.forwarded_allow_ips))
    wsgi = app.wsgi_app
    if settings.edge_hits:
        # Fresh cache hits are answered before Flask's dispatch; everything else goes on to it.
        wsgi = CachedHitEdge(wsgi, app, arrival)
    if settings.trusted_proxy_count:
        # X-Forwarded-For counts only from FORWARDED_ALLOW_IPS, and only the entries the
        # trusted proxies appended: a client's own entries sit further left and are ignored.
        wsgi = TrustedForwardedFor(wsgi, parse_networks(settings.forwarded_allow_ips), settings.trusted_proxy_count)
    app.wsgi_app = RawPathMiddleware(wsgi, arrival)  # type: ignore[method-assign]
    if settings.demo_mode:
        log.warning("DEMO MODE: serving simulated Amplitude data from %s", settings.amplitude_api_url)
    return app
