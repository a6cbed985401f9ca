"""Connected Content as Braze performs it: options, credentials, per-URL reuse, what gets saved."""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from app.preview.results import Call, TemplateWarning

#: Options Braze's ``connected_content`` accepts; ``:retry`` and ``:no_cache`` take no value.
OPTIONS = frozenset(
    {
        "save",
        "basic_auth",
        "auth_credentials",
        "headers",
        "retry",
        "cache_max_age",
        "no_cache",
        "method",
        "body",
        "content_type",
        "cache",
    }
)
FLAGS = frozenset({"retry", "no_cache"})
#: Braze gives an endpoint this long, and refuses bigger bodies.
BRAZE_TIMEOUT_SECONDS, BRAZE_MAX_BODY_BYTES = 2.0, 1_000_000
#: Distinct requests one render may make: a loop around a call must not become a flood.
MAX_CALLS_PER_RENDER = 20
_OPTION = re.compile(r"(?:^|\s):(\w+)")
_ROUTE = re.compile(r"/v1/(?:users|devices)/")


@dataclass
class CallSpec:
    """A rendered (or written) ``connected_content`` markup, split into URL and options."""

    url: str
    options: dict[str, str | None] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    headers_invalid: bool = False

    @property
    def save(self) -> str | None:
        return self.options.get("save") or None

    @property
    def method(self) -> str:
        return (self.options.get("method") or "get").upper()


def _json_object_end(text: str, start: int) -> int:
    """Index after the ``{...}`` starting at *start* (strings may hold braces)."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            escaped, in_string = (not escaped and char == "\\"), in_string and not (char == '"' and not escaped)
        elif char == '"':
            in_string = True
        elif char in "{}":
            depth += 1 if char == "{" else -1
            if depth == 0:
                return i + 1
    return len(text)


def parse_call(markup: str) -> CallSpec:
    """Split ``URL :save x :headers {...} :retry`` into a :class:`CallSpec`."""
    url, *more = markup.strip().split(None, 1) or [""]
    rest = " " + more[0] if more else ""
    spec = CallSpec(url=url)
    pos = 0
    while (match := _OPTION.search(rest, pos)) is not None:
        name, pos = match.group(1), match.end()
        if name not in OPTIONS:
            spec.unknown.append(name)
            continue
        if name in FLAGS:
            spec.options[name] = None
            continue
        value_start = len(rest) - len(rest[pos:].lstrip())
        if name == "headers" and rest.startswith("{", value_start):
            end = _json_object_end(rest, value_start)
            try:
                headers = json.loads(rest[value_start:end])
                spec.headers = {str(k): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {}
            except ValueError:
                spec.headers_invalid = True
            spec.options[name], pos = rest[value_start:end], end
        elif name == "body":
            following = _OPTION.search(rest, value_start)
            end = following.start() if following else len(rest)
            spec.options[name], pos = rest[value_start:end].strip(), end
        else:
            value = rest[value_start:].split(None, 1)[0] if rest[value_start:].strip() else ""
            spec.options[name], pos = value, value_start + len(value)
    return spec


def service_path(url: str) -> str | None:
    """The path and query to ask this service for, when *url* names one of its per-user routes."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    match = _ROUTE.search(parts.path)
    if parts.scheme not in ("http", "https") or match is None:
        return None
    return parts.path[match.start() :] + (f"?{parts.query}" if parts.query else "")


@dataclass
class Answer:
    """What a transport got back."""

    status: int | None
    body: bytes = b""
    cache: str | None = None
    age: int | None = None
    ms: float = 0.0
    error: str | None = None


class Transport(Protocol):
    """Carries a request to the service (``path`` set) or, when it can, to another host."""

    reaches_other_hosts: bool

    def send(self, method: str, url: str, path: str | None, headers: dict[str, str], body: str | None) -> Answer: ...


@dataclass(frozen=True)
class Credentials:
    """Braze's stored credentials for this preview, and the caller key used for the service."""

    named: dict[str, tuple[str, str]] = field(default_factory=dict)  # NAME -> (user, password)
    caller_key: str | None = None  # only ever sent to the service, never to another host

    def secrets(self) -> tuple[str, ...]:
        values = [password for _, password in self.named.values()] + [self.caller_key or ""]
        return tuple(value for value in values if len(value) >= 8)  # shorter ones would redact ordinary text

    def headers_for(self, spec: CallSpec, to_service: bool) -> dict[str, str]:
        """The Authorization header Braze would send for *spec*'s stored credential, if any."""
        name = spec.options.get("basic_auth") or spec.options.get("auth_credentials")
        if not name:
            return {}
        if name in self.named:
            user, password = self.named[name]
        elif to_service and self.caller_key:
            user, password = name, self.caller_key
        else:
            return {}
        if "basic_auth" in spec.options:
            return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
        return {"Authorization": f"Bearer {password}"}


class BrazeUrlCache:
    """Braze's per-URL cache of successful GET answers, shared by every recipient of a dry run."""

    def __init__(self) -> None:
        self._answers: dict[str, Answer] = {}
        self._lock = threading.Lock()

    def get(self, url: str) -> Answer | None:
        with self._lock:
            return self._answers.get(url)

    def put(self, url: str, answer: Answer) -> None:
        if answer.status is not None and 200 <= answer.status < 300 and len(answer.body) <= BRAZE_MAX_BODY_BYTES:
            with self._lock:
                self._answers[url] = answer


def _flag(value: Any, key: str) -> bool:
    """Whether *key* is true anywhere inside *value*."""
    if isinstance(value, dict):
        return value.get(key) is True or any(_flag(v, key) for v in value.values())
    return isinstance(value, list) and any(_flag(v, key) for v in value)


class Session:
    """One recipient's Connected Content: makes each distinct request once and records it."""

    def __init__(
        self,
        transport: Transport,
        credentials: Credentials,
        *,
        allow_external: bool = False,
        braze_cache: BrazeUrlCache | None = None,
    ) -> None:
        self.transport, self.credentials, self.braze_cache = transport, credentials, braze_cache
        self.allow_external = allow_external and transport.reaches_other_hosts
        self.calls: list[Call] = []
        self.warnings: list[TemplateWarning] = []
        self._answers: dict[tuple[str, str, str | None], Answer] = {}

    def redact(self, text: str) -> str:
        for secret in self.credentials.secrets():
            text = text.replace(secret, "<redacted>")
        return text

    def warn(self, line: int, code: str, message: str) -> None:
        warning = TemplateWarning(line, code, message)
        if warning not in self.warnings:
            self.warnings.append(warning)

    def connected_content(self, markup: str, line: int) -> tuple[str | None, object, str]:
        """Carry out one rendered tag: (``:save`` name, saved value, text inserted in the message)."""
        spec = parse_call(markup)
        call = Call(url=self.redact(spec.url), line=line, saved_as=spec.save)
        self.calls.append(call)
        if self.redact(spec.url) != spec.url:
            self.warn(line, "secret-in-url", "the rendered URL contains a credential; Braze logs rendered URLs")
        answer = self._answer(spec, call)
        call.status, call.age, call.ms = answer.status, answer.age, answer.ms
        call.cache = call.cache or answer.cache
        call.error = call.error or answer.error
        ok = answer.status is not None and 200 <= answer.status < 300 and len(answer.body) <= BRAZE_MAX_BODY_BYTES
        if not ok:  # the call's status says why; the template's fallbacks are what the lints check
            call.empty = True
            return spec.save, None, ""
        text = answer.body.decode("utf-8", "replace")
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, dict):
            value["__http_status_code__"] = answer.status
            call.fallback, call.control = _flag(value, "fallback"), _flag(value, "is_control")
            return spec.save, value, ""
        call.empty = spec.save is not None
        return spec.save, None, "" if spec.save else text

    def _answer(self, spec: CallSpec, call: Call) -> Answer:
        """Reuse this recipient's identical request, Braze's URL cache, or send it."""
        key = (spec.method, spec.url, spec.options.get("body"))
        if key in self._answers:
            call.cache = "reused"
            return self._answers[key]
        path = service_path(spec.url)
        if path is None and not self.allow_external:
            call.error = "not made: not a route of this service (--allow-external to call other hosts)"
            self.warn(call.line, "external-call-skipped", f"{call.url} is not a route of this service: not called")
            return Answer(status=None)
        if len(self._answers) >= MAX_CALLS_PER_RENDER:
            call.error = "not made: too many calls"
            self.warn(
                call.line, "too-many-calls", f"more than {MAX_CALLS_PER_RENDER} different requests in one message"
            )
            return Answer(status=None)
        cacheable = spec.method == "GET" and "no_cache" not in spec.options
        cached = self.braze_cache.get(spec.url) if self.braze_cache is not None and cacheable else None
        if cached is not None:
            call.cache = "braze-cache"
            answer = cached
        else:
            headers = {
                "Content-Type": spec.options.get("content_type") or "application/json",
                "Accept": "*/*",
                "User-Agent": "Braze Sender (preview)",
                **self.credentials.headers_for(spec, path is not None),
                **spec.headers,
            }
            answer = self.transport.send(spec.method, spec.url, path, headers, spec.options.get("body"))
            if self.braze_cache is not None and cacheable:
                self.braze_cache.put(spec.url, answer)
        self._answers[key] = answer
        return answer
