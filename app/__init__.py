"""Braze Connected Content endpoints over Amplitude's User Profile API."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from app.errors import register_error_handlers
from app.extensions import ProxyExtensions
from app.hooks import register_request_hooks
from app.middleware import RawPathMiddleware
from app.observability import configure_logging
from app.settings import Settings, load_settings

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    environ: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
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
    app.extensions["profile_proxy"] = ProxyExtensions.build(settings, clock=clock, monotonic=monotonic)
    register_error_handlers(app)
    register_request_hooks(app)

    from app.views import health, v1

    app.register_blueprint(health)
    app.register_blueprint(v1)
    wsgi = app.wsgi_app
    if settings.trusted_proxy_count:
        # Only the addresses the trusted proxies appended count: a client's own
        # X-Forwarded-For entries sit further left and are ignored.
        wsgi = ProxyFix(wsgi, x_for=settings.trusted_proxy_count, x_proto=settings.trusted_proxy_count)
    app.wsgi_app = RawPathMiddleware(wsgi)  # type: ignore[method-assign]
    if settings.demo_mode:
        log.warning("DEMO MODE: serving simulated Amplitude data from %s", settings.amplitude_api_url)
    return app
