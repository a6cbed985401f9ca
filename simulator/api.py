"""The profile endpoint's logic without HTTP: auth, query validation, and the answer to send."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from http import HTTPStatus
from typing import Any

from simulator import data

UNKNOWN_USER = b'{"error":"User id and device id not seen before"}'
RATE_LIMITED = (
    b'{"error":"Number of requests per minute exceeds system limit. Contact Support if you need this limit raised"}'
)
MISSING_KEY = b"Missing Api-Key in Authorization header"
INVALID_KEY = b"Invalid Api-Key"
FLAG_NAMES = ("get_amp_props", "get_cohort_ids", "get_computations", "get_recs", "get_propensity")
LIST_NAMES = ("rec_id", "prediction_id")
HTML_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>"
    "<body><h1>Service temporarily unavailable</h1><p>Please try again later.</p></body></html>\n"
)


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete HTTP answer: status, body, its content type (None: no header) and extra headers."""

    status: int
    body: bytes
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_answer(status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    """A JSON answer; bytes and str payloads are sent as they are."""
    if isinstance(payload, str):
        body = payload.encode()
    elif isinstance(payload, bytes):
        body = payload
    else:
        body = json.dumps(payload, separators=(",", ":")).encode()
    return Answer(status, body, "application/json", headers)


def error(status: int, message: str) -> Answer:
    """``{"error": message}`` with *status*."""
    return json_answer(status, {"error": message})


def check_key(authorization: str | None, secret_key: str) -> Answer | None:
    """The 401 for a missing or wrong ``Authorization: Api-Key`` header, else None."""
    if not authorization:
        return Answer(401, MISSING_KEY, "text/plain")
    if authorization != f"Api-Key {secret_key}":
        return Answer(401, INVALID_KEY, "text/plain")
    return None


def parse_flags(params: list[tuple[str, str]]) -> dict[str, Any]:
    """Read the query as :func:`simulator.data.user_data` wants it (the last of repeated names wins)."""
    query = dict(params)
    flags: dict[str, Any] = {name: query.get(name) == "true" for name in FLAG_NAMES}
    for name in LIST_NAMES:
        flags[name] = [part for part in query.get(name, "").split(",") if part]
    # comp_id absent means every computation; present (even empty) selects.
    flags["comp_id"] = [c for c in query["comp_id"].split(",") if c] if "comp_id" in query else None
    flags["rec_type"] = query.get("rec_type")
    flags["propensity_type"] = query.get("propensity_type", "score")
    return flags


def invalid(flags: dict[str, Any]) -> str | None:
    """Why the flags make a bad request, or None."""
    if flags["get_recs"] and not flags["rec_id"]:
        return "rec_id is required with get_recs"
    if flags["rec_type"] not in (None, "model", "random"):
        return "rec_type must be model or random"
    if flags["get_propensity"] and not flags["prediction_id"]:
        return "prediction_id is required with get_propensity"
    if flags["propensity_type"] not in ("score", "pct"):
        return "propensity_type must be score or pct"
    return None


def identity_of(params: list[tuple[str, str]]) -> tuple[str, str] | None:
    """``(kind, identity)`` from ``user_id`` (preferred) or ``device_id``; None when neither is given."""
    query = dict(params)
    if query.get("user_id"):
        return "user", query["user_id"]
    if query.get("device_id"):
        return "device", query["device_id"]
    return None


def profile(params: list[tuple[str, str]], rec_ids: frozenset[str], unknown_user_status: int) -> Answer:
    """The answer of an authorized, admitted profile request."""
    who = identity_of(params)
    if who is None:
        return error(400, "user_id or device_id is required")
    flags = parse_flags(params)
    problem = invalid(flags)
    if problem:
        return error(400, problem)
    kind, identity = who
    if data.is_unknown(identity):
        return Answer(unknown_user_status, UNKNOWN_USER)
    return Answer(200, _profile_body(kind, identity, _freeze(flags), rec_ids))


def padded(answer: Answer, size_bytes: int) -> Answer:
    """*answer* with its ``amp_props`` padded so the body is at least *size_bytes* long."""
    payload = json.loads(answer.body)
    if not isinstance(payload, dict) or "userData" not in payload:
        return answer  # an error body has no amp_props to pad
    user = payload["userData"]
    props = user["amp_props"] = dict(user["amp_props"] or {})
    props["padding"] = ""
    base = len(json.dumps(payload, separators=(",", ":")))
    props["padding"] = "x" * max(0, size_bytes - base)
    return json_answer(answer.status, payload, answer.headers)


def _freeze(flags: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(flags.items()))


@lru_cache(maxsize=8192)
def _profile_body(kind: str, identity: str, frozen: tuple[tuple[str, Any], ...], rec_ids: frozenset[str]) -> bytes:
    # Bounded cache: repeated requests (benchmarks, stampedes) cost only the HTTP parsing.
    flags = {k: list(v) if isinstance(v, tuple) else v for k, v in frozen}
    body = {"userData": data.user_data(kind, identity, flags, rec_ids)}
    return json.dumps(body, separators=(",", ":")).encode()


def fault_answer(mode: str, options: dict[str, Any]) -> Answer | None:
    """The answer a fault sends in place of the real one, or None when the fault is not of that kind."""
    if mode == "status":
        status = int(options.get("status", 500))
        default = {"error": f"simulated {status} {_reason(status)}".rstrip()}
        return json_answer(status, options.get("body", default), _retry_after(options))
    if mode == "rate_limited":
        return Answer(429, RATE_LIMITED, headers=_retry_after(options))
    if mode == "html":
        body = options.get("body", HTML_PAGE)
        return Answer(200, body.encode() if isinstance(body, str) else body, "text/html; charset=utf-8")
    if mode == "wrong_shape":
        return json_answer(200, options.get("body", {"data": []}))
    if mode == "unauthorized":
        return Answer(401, INVALID_KEY, "text/plain")
    return None


def _retry_after(options: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    retry_after = options.get("retry_after")
    return (("Retry-After", str(retry_after)),) if retry_after is not None else ()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
