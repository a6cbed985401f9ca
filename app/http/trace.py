"""One request's context, built by the gate and read by the views and the lookup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.clock import Deadline
    from app.core.query import Identity
    from app.extensions import ProxyExtensions


@dataclass(slots=True)
class RequestTrace:
    """Who asks, about whom, by when, and what the request did (logged when it ends).

    Views read it once from ``g``: every ``g``/``request``/``current_app`` access is a
    context-local lookup, and a cached answer has little else to spend time on.
    """

    request_id: str
    #: The monotonic arrival time (the front's stamp, else when the app first saw it).
    started: float
    extensions: ProxyExtensions
    #: When the answer is due: every wait on the request's behalf ends by then.
    deadline: Deadline
    #: The caller key's name (``"open"`` without keys); None before authentication.
    caller: str | None = None
    #: What the cache did: hit, miss, stale, negative, never_stored (None: no lookup).
    cache: str | None = None
    upstream_ms: float = 0.0
    #: From arrival until the service started on it (in front of the app).
    queue_ms: float = 0.0
    identity: Identity | None = None
    raw_query: str = ""

    @property
    def subject(self) -> Identity:
        """The user or device a data route is about (the gate decodes it before the view runs)."""
        if self.identity is None:
            raise LookupError("this route names no user or device")
        return self.identity
