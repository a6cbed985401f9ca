"""Braze Connected Content endpoints over Amplitude's User Profile API."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping

from flask import Flask

from app.errors import register_error_handlers
from app.extensions import ProxyExtensions
from app.middleware import RawPathMiddleware
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
    app = Flask(__name__, static_folder=None)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["profile_proxy"] = ProxyExtensions.build(settings, clock=clock, monotonic=monotonic)
    register_error_handlers(app)

    from app.views import health, v1

    app.register_blueprint(health)
    app.register_blueprint(v1)
    app.wsgi_app = RawPathMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    if settings.demo_mode:
        log.warning("DEMO MODE: serving simulated Amplitude data from %s", settings.amplitude_api_url)
    return app
