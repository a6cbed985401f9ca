"""Carry Connected Content requests: over HTTP to a running service, or in-process to this app."""

from __future__ import annotations

import contextvars
import json
import time
from typing import Any

import requests
from flask import Flask

from app.preview.calls import BRAZE_MAX_BODY_BYTES, BRAZE_TIMEOUT_SECONDS, Answer


class ServiceUnreachable(Exception):
    """The service at PROXY_URL does not answer: every call would fail the same way."""


def _error_code(status: int, body: bytes) -> str | None:
    if 200 <= status < 300:
        return None
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    return str(decoded.get("error")) if isinstance(decoded, dict) and decoded.get("error") else None


def _age(headers: Any) -> int | None:
    value = headers.get("Age", "")
    return int(value) if value.isdigit() else None


class HttpTransport:
    """Service routes go to *base_url* (whatever host the template names); other hosts as named."""

    reaches_other_hosts = True

    def __init__(self, base_url: str, session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session or requests.Session()

    def send(self, method: str, url: str, path: str | None, headers: dict[str, str], body: str | None) -> Answer:
        """Make the request as Braze would: no redirects, 2 s, bodies over 1 MB refused."""
        target = self.base_url + path if path is not None else url
        started = time.monotonic()
        try:
            with self.session.request(
                method,
                target,
                headers=headers,
                data=body,
                stream=True,
                allow_redirects=False,
                timeout=(BRAZE_TIMEOUT_SECONDS, BRAZE_TIMEOUT_SECONDS),
            ) as response:
                content = response.raw.read(BRAZE_MAX_BODY_BYTES + 1, decode_content=True)
                ms = (time.monotonic() - started) * 1000
                if ms > BRAZE_TIMEOUT_SECONDS * 1000:
                    return Answer(status=None, ms=ms, error="timeout")
                return Answer(
                    response.status_code,
                    content,
                    response.headers.get("X-Cache"),
                    _age(response.headers),
                    ms,
                    _error_code(response.status_code, content),
                )
        except requests.Timeout:
            return Answer(status=None, ms=(time.monotonic() - started) * 1000, error="timeout")
        except requests.ConnectionError:
            if path is not None:
                raise ServiceUnreachable(f"cannot connect to {self.base_url} (set --url or PROXY_URL)") from None
            return Answer(status=None, ms=(time.monotonic() - started) * 1000, error="connection failed")

    def close(self) -> None:
        self.session.close()


class WsgiTransport:
    """Answer service routes in-process through *app*'s own WSGI stack; never reach another host."""

    reaches_other_hosts = False

    def __init__(self, app: Flask, remote_addr: str) -> None:
        self.client = app.test_client(use_cookies=False)
        self.remote_addr = remote_addr

    def send(self, method: str, url: str, path: str | None, headers: dict[str, str], body: str | None) -> Answer:
        """Run the request through the app (its middleware, auth, cache and budget) in a fresh context."""
        if path is None:
            return Answer(status=None, error="not made: the page only calls this service")
        started = time.monotonic()
        overrides = {"REQUEST_URI": path, "REMOTE_ADDR": self.remote_addr}

        def call() -> Any:
            return self.client.open(path, method=method, headers=headers, data=body, environ_overrides=overrides)

        # An empty context: the inner request gets its own app context (and `g`), not the page's.
        response = contextvars.Context().run(call)
        try:
            content = response.get_data()
            return Answer(
                response.status_code,
                content,
                response.headers.get("X-Cache"),
                _age(response.headers),
                (time.monotonic() - started) * 1000,
                _error_code(response.status_code, content),
            )
        finally:
            response.close()
