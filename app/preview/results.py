"""What a preview produces: the message, the calls it made, the warnings, as text or JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TemplateWarning:
    """A mistake in the template (or in how this render went), at a line, with a stable code."""

    line: int
    code: str
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "message": self.message}

    def __str__(self) -> str:
        return f"line {self.line}: {self.code}: {self.message}"


@dataclass
class Call:
    """One ``connected_content`` evaluation, as Braze's Connected Content debugger would show it."""

    url: str  # as rendered, with any known key replaced by <redacted>
    line: int
    status: int | None = None  # None: not made, timed out or unreachable
    cache: str | None = None  # the service's X-Cache; "reused" when Braze would not call again
    ms: float = 0.0
    saved_as: str | None = None
    age: int | None = None
    error: str | None = None  # the service's error code, "timeout", "not made: ..."
    fallback: bool = False  # the answer holds "fallback": true (the service's default= pattern)
    control: bool = False  # the answer holds "is_control": true
    empty: bool = False  # Braze would render nothing / leave the variable empty

    @property
    def fetched(self) -> bool:
        """Braze would make this request (not answered from its per-URL cache, not skipped)."""
        return self.cache not in ("reused", "braze-cache") and not (self.error or "").startswith("not made")

    def as_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "status": self.status,
            "cache": self.cache,
            "ms": round(self.ms, 1),
            "saved_as": self.saved_as,
        }

    def __str__(self) -> str:
        status = str(self.status) if self.status is not None else (self.error or "no answer")
        detail = f" {self.error}" if self.error and self.status is not None else ""
        cache = f" {self.cache}" if self.cache else ""
        age = f" age {self.age}s" if self.age is not None else ""
        saved = f" -> {self.saved_as}" if self.saved_as else ""
        return f"line {self.line}: GET {self.url} -> {status}{detail}{cache}{age} {self.ms:.0f} ms{saved}"


@dataclass
class Preview:
    """One recipient's render."""

    user_id: str | None
    rendered: str | None = None
    aborted: str | None = None
    calls: list[Call] = field(default_factory=list)
    warnings: list[TemplateWarning] = field(default_factory=list)
    control: bool = False  # an is_control the template reads was true (not part of the JSON)

    def as_json(self) -> dict[str, Any]:
        """The issue's shape: user_id, rendered, aborted, calls, warnings."""
        return {
            "user_id": self.user_id,
            "rendered": self.rendered,
            "aborted": self.aborted,
            "calls": [call.as_json() for call in self.calls],
            "warnings": [warning.as_json() for warning in self.warnings],
        }
