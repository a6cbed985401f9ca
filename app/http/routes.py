"""A route in one place: its path, who may call it, its query schema and its response schema.

``@route(target, "/cohorts", response=CohortsResponse)`` registers the view, and the same
declaration feeds the gate (which credentials it needs), query validation (parsed once per
distinct query string) and the OpenAPI document, as flask-smorest's ``@arguments`` and
``@response`` do. The target is a :class:`RouteTable` for the data routes, which
:class:`app.http.data.DataRoutes` serves without Flask (their views return an
:class:`Answer`), or a Flask ``Blueprint`` for the operators' and webhook routes (their
views return a Flask ``Response``). Every route is in exactly one of the two.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from flask import Blueprint, Response, g
from marshmallow import Schema
from werkzeug.exceptions import MethodNotAllowed, NotFound

from app.http.params import load_args, parse_query

#: Who may call a route: ``caller`` (a caller key, from an allowed address: the data routes),
#: ``admin`` (an admin key when ADMIN_API_KEYS is set, else a caller key: reading /metrics),
#: ``operator`` (an admin key, always: actions that change state), ``webhook`` (Amplitude,
#: which has no fixed addresses: no allowlist, and the view checks the webhook secret),
#: None (probes, from inside the network).
Auth = Literal["caller", "admin", "operator", "webhook", None]


@dataclass(slots=True)
class Answer:
    """A data route's one success: a 200 with this JSON object and these headers."""

    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RouteSpec:
    """What a route declares about itself."""

    endpoint: str
    rule: str
    summary: str
    description: str
    response: type[Schema] | None
    args: Schema | None = None
    auth: Auth = "caller"
    documented: bool = True
    view: Callable[..., Any] | None = None  # (trace, args, **path values)
    method: str = "GET"

    @property
    def serves_data(self) -> bool:
        return self.auth == "caller"

    @property
    def checks_query(self) -> bool:
        """Data routes reject a malformed query even when they take no arguments; probes and tools ignore theirs."""
        return self.args is not None or self.serves_data


#: endpoint -> spec, filled as the view modules are imported (code, not configuration).
ROUTES: dict[str, RouteSpec] = {}

_NO_ARGS: Mapping[str, Any] = MappingProxyType({})


class RouteTable:
    """The data routes under one prefix, and their matcher.

    Rules are written as werkzeug's (``/v1/<any(users, devices):kind>/<id>/cohorts/<cohort_id>``),
    and match as werkzeug's would with Flask's defaults and no slash merging: a variable is
    one non-empty segment, ``any(...)`` one of its words, anything else a literal, and ``//``
    or a trailing ``/`` match nothing. A data route's path has a handful of segments and the
    table a handful of rules, so each is compared segment by segment: werkzeug's general
    state machine took a twentieth of a cached answer's CPU for the same result.
    """

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self.prefix = prefix
        self.specs: dict[str, RouteSpec] = {}
        self._patterns: list[tuple[RouteSpec, tuple[_Segment, ...]]] = []

    def add(self, spec: RouteSpec) -> None:
        self.specs[spec.endpoint] = spec
        self._patterns.append((spec, tuple(_segment(part) for part in spec.rule.split("/"))))

    def match(self, path: str, method: str) -> tuple[RouteSpec, dict[str, str]]:
        """The route *path* names and its raw (still percent-encoded) path values.

        :raises NotFound: no rule matches the path.
        :raises MethodNotAllowed: a rule matches, for another method (GET also answers HEAD).
        """
        parts = path.split("/")
        allowed: set[str] = set()
        for spec, pattern in self._patterns:
            if len(pattern) != len(parts):
                continue
            values = _matched(pattern, parts)
            if values is None:
                continue
            methods = {spec.method, "HEAD"} if spec.method == "GET" else {spec.method}
            if method in methods:
                return spec, values
            allowed |= methods
        if allowed:
            raise MethodNotAllowed(valid_methods=sorted(allowed))
        raise NotFound()


#: One segment of a rule: a literal (name None), a variable (words None), or ``any(...)``.
_Segment = tuple[str | None, str | None, frozenset[str] | None]
_VARIABLE = re.compile(r"<(?:any\((?P<words>[^)]*)\):)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)>")


def _segment(part: str) -> _Segment:
    found = _VARIABLE.fullmatch(part)
    if found is None:
        return part, None, None
    words = found.group("words")
    choices = frozenset(word.strip() for word in words.split(",")) if words is not None else None
    return None, found.group("name"), choices


def _matched(pattern: tuple[_Segment, ...], parts: list[str]) -> dict[str, str] | None:
    values: dict[str, str] = {}
    for (literal, name, choices), part in zip(pattern, parts, strict=True):
        if name is None:
            if part != literal:
                return None
        elif not part or (choices is not None and part not in choices):
            return None
        else:
            values[name] = part
    return values


def route(
    target: Blueprint | RouteTable,
    rule: str,
    *,
    summary: str,
    response: type[Schema] | None,
    description: str = "",
    args: type[Schema] | None = None,
    auth: Auth = "caller",
    documented: bool = True,
    method: str = "GET",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a view taking ``(trace, args, **path_values)`` with its contract (one method: GET by default)."""

    def register(view: Callable[..., Any]) -> Callable[..., Any]:
        full_rule = target.prefix + rule if isinstance(target, RouteTable) else rule
        spec = RouteSpec(
            endpoint=f"{target.name}.{view.__name__}",
            rule=full_rule,
            summary=summary,
            description=description or (view.__doc__ or "").strip(),
            response=response,
            args=args() if args is not None else None,
            auth=auth,
            documented=documented,
            view=view,
            method=method,
        )
        ROUTES[spec.endpoint] = spec
        if isinstance(target, RouteTable):
            target.add(spec)
            return view

        @functools.wraps(view)
        def dispatch(**values: Any) -> Response:
            trace = g.trace
            return view(trace, query_args(spec.args, trace.raw_query) if spec.checks_query else _NO_ARGS, **values)

        target.add_url_rule(rule, endpoint=view.__name__, view_func=dispatch, methods=[method])
        return view

    return register


#: Query strings up to this long are parsed once and remembered (Braze sends the same few,
#: one per template, over and over); longer ones, rare and up to 8 KB, are parsed each time,
#: so the remembered ones hold at most ``_REMEMBERED`` x this many bytes of keys.
_REMEMBERED_QUERY_BYTES = 512
_REMEMBERED = 1024


def query_args(schema: Schema | None, raw_query: str) -> Mapping[str, Any]:
    """Parse and validate a raw query string for one route's schema (read-only result).

    A route without arguments still rejects a malformed query. Failures raise (and are
    never remembered).
    """
    if len(raw_query) <= _REMEMBERED_QUERY_BYTES:
        return _remembered_args(schema, raw_query)
    return _parse_args(schema, raw_query)


def _parse_args(schema: Schema | None, raw_query: str) -> Mapping[str, Any]:
    parsed = parse_query(raw_query)
    if schema is None:
        return _NO_ARGS
    return MappingProxyType(load_args(schema, parsed))


_remembered_args = functools.lru_cache(maxsize=_REMEMBERED)(_parse_args)
