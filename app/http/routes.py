"""A route in one place: its path, who may call it, its query schema and its response schema.

``@route(blueprint, "/cohorts", response=CohortsResponse)`` registers the view, and the
same declaration feeds the gate (which credentials it needs), query validation (parsed
once per distinct query string) and the OpenAPI document, as flask-smorest's
``@arguments``/``@response`` do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from flask import Blueprint, Response, g
from marshmallow import Schema

from app.http.params import load_args, parse_query

#: Who may call a route: ``caller`` (a caller key, from an allowed address: the data routes),
#: ``admin`` (an admin key when ADMIN_API_KEYS is set, else a caller key: reading /metrics),
#: ``operator`` (an admin key, always: actions that change state), ``webhook`` (Amplitude,
#: which has no fixed addresses: no allowlist, and the view checks the webhook secret),
#: None (probes, from inside the network).
Auth = Literal["caller", "admin", "operator", "webhook", None]


@dataclass(frozen=True)
class RouteSpec:
    """What a route declares about itself."""

    endpoint: str
    summary: str
    description: str
    response: type[Schema] | None
    args: Schema | None = None
    auth: Auth = "caller"
    documented: bool = True
    view: Callable[..., Response] | None = None  # (trace, args, **path values)
    method: str = "GET"

    @property
    def serves_data(self) -> bool:
        return self.auth == "caller"


#: endpoint -> spec, filled as the view modules are imported (code, not configuration).
ROUTES: dict[str, RouteSpec] = {}

_NO_ARGS: Mapping[str, Any] = MappingProxyType({})


def route(
    blueprint: Blueprint,
    rule: str,
    *,
    summary: str,
    response: type[Schema] | None,
    description: str = "",
    args: type[Schema] | None = None,
    auth: Auth = "caller",
    documented: bool = True,
    method: str = "GET",
) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """Register a view taking ``(trace, args, **path_values)`` with its contract (one method: GET by default)."""

    def register(view: Callable[..., Response]) -> Callable[..., Response]:
        spec = RouteSpec(
            endpoint=f"{blueprint.name}.{view.__name__}",
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

        # Data routes reject a malformed query even when they take no arguments;
        # probes and tools ignore theirs.
        checks_query = spec.args is not None or spec.serves_data

        @functools.wraps(view)
        def dispatch(**values: Any) -> Response:
            trace = g.trace
            args = query_args(spec.args, trace.raw_query) if checks_query else _NO_ARGS
            return view(trace, args, **values)

        blueprint.add_url_rule(rule, endpoint=view.__name__, view_func=dispatch, methods=[method])
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
