"""The client's address: from ``X-Forwarded-For`` only when the connection comes from a named proxy.

werkzeug's ``ProxyFix`` believes the header from any peer, so a client that connects
directly could pick its own address (and escape the allowlist or the authentication
brake). Here the header counts only when ``REMOTE_ADDR`` is one of ``FORWARDED_ALLOW_IPS``,
the same setting gunicorn uses for the forwarded scheme.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from app.http.security import IPNetwork, address_in, parse_ip

WSGIApp = Any

#: Where the connecting peer's own address is kept once ``REMOTE_ADDR`` is replaced.
PEER_KEY = "profile_proxy.peer_addr"


class TrustedForwardedFor:
    """Set ``REMOTE_ADDR`` (and the scheme) from what the trusted proxies appended.

    *hops* is ``TRUSTED_PROXY_COUNT``: how many proxies append to ``X-Forwarded-For``.
    The entry that many places from the right is the client; entries further left were
    written by the client and are never read. Fewer entries than *hops*, or an entry
    that is not an address, leave the connection's own address in place.
    """

    def __init__(self, app: WSGIApp, proxies: tuple[IPNetwork, ...], hops: int) -> None:
        self.app = app
        self.proxies = proxies
        self.hops = hops

    def trusts(self, peer: str | None) -> bool:
        """Whether *peer* is one of the named proxies."""
        return address_in(peer, self.proxies)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        peer = environ.get("REMOTE_ADDR")
        environ[PEER_KEY] = peer
        if self.hops and self.trusts(peer):
            client = self._entry(environ.get("HTTP_X_FORWARDED_FOR"))
            if client is not None and parse_ip(client) is not None:
                environ["REMOTE_ADDR"] = client.strip()
            scheme = self._entry(environ.get("HTTP_X_FORWARDED_PROTO"))
            if scheme is not None and scheme.strip().lower() in ("http", "https"):
                environ["wsgi.url_scheme"] = scheme.strip().lower()
        return self.app(environ, start_response)

    def _entry(self, header: str | None) -> str | None:
        if not header:
            return None
        entries = [entry for entry in header.split(",") if entry.strip()]
        if len(entries) < self.hops:
            return None
        return entries[-self.hops]
