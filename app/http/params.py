"""The one validation layer for identities, path segments and query arguments.

Everything here runs before any cache lookup or upstream call; a bad value becomes a
400 ``invalid_request`` naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

from marshmallow import EXCLUDE, Schema, ValidationError, fields
from marshmallow.validate import OneOf, Range

from app.errors import InvalidRequest
from app.settings import first_problem

MAX_ID_BYTES = 1024
MAX_QUERY_BYTES = 8192
MAX_LIST_ITEMS = 100

# C0/C1 controls (CR, LF, NUL...), lone surrogates, and the bidirectional overrides that
# make an id display as something other than what it is.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff\ufeff]")


def check_text(field: str, value: str, max_bytes: int = MAX_ID_BYTES) -> str:
    """Return *value* if it is a usable id, else raise ``InvalidRequest`` naming *field*."""
    if not value:
        raise InvalidRequest(field, "must not be empty")
    if len(value) > max_bytes or len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidRequest(field, f"must be at most {max_bytes} bytes")
    if _FORBIDDEN.search(value):
        raise InvalidRequest(field, "must not contain control or bidirectional-override characters")
    if value in (".", ".."):
        raise InvalidRequest(field, "must not be a relative path segment")
    return value


def decode_segment(field: str, raw: str) -> str:
    """Decode one raw (still percent-encoded) path segment as strict UTF-8 and check it."""
    try:
        value = unquote_to_bytes(raw.encode("latin-1")).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise InvalidRequest(field, "must be valid UTF-8") from None
    return check_text(field, value)


def parse_query(raw_query: str) -> dict[str, str]:
    """Split a raw query string strictly: valid UTF-8, bounded size, no repeated names."""
    if len(raw_query) > MAX_QUERY_BYTES:
        raise InvalidRequest("query", f"must be at most {MAX_QUERY_BYTES} bytes")
    args: dict[str, str] = {}
    if not raw_query:
        return args
    try:
        if not raw_query.isascii():
            # Raw (unescaped) bytes arrive as latin-1 text in WSGI: read them as UTF-8.
            raw_query = raw_query.encode("latin-1").decode("utf-8")
        pairs = parse_qsl(raw_query, keep_blank_values=True, max_num_fields=64, encoding="utf-8", errors="strict")
    except UnicodeError:
        raise InvalidRequest("query", "must be valid UTF-8") from None
    except ValueError:
        raise InvalidRequest("query", "has too many parameters or is malformed") from None
    for name, value in pairs:
        if name in args:
            raise InvalidRequest(name, "must be given at most once")
        args[name] = value
    return args


class Digits(fields.Integer):
    """A whole number written as plain ASCII digits: no sign, spaces, underscores or controls."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 6:
            raise ValidationError("must be a whole number written with digits only")
        return int(value)


class IdList(fields.Field):
    """A comma-separated list of ids, each checked like a path segment."""

    def __init__(self, max_items: int = MAX_LIST_ITEMS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_items = max_items

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, ...]:
        items = [part.strip(" ") for part in str(value).split(",")]
        if not value or any(not item for item in items):
            raise ValidationError("must be a comma-separated list of non-empty ids")
        if len(items) > self.max_items:
            raise ValidationError(f"must list at most {self.max_items} ids")
        for item in items:
            try:
                check_text(attr or "value", item)
            except InvalidRequest as exc:
                raise ValidationError(exc.message.split(": ", 1)[-1]) from None
        return tuple(dict.fromkeys(items))


class RecommendationArgs(Schema):
    class Meta:
        unknown = EXCLUDE

    limit = Digits(validate=Range(min=1, max=100))
    rec_type = fields.String(validate=OneOf(["model", "random"]))
    default = IdList()


class RecommendationListArgs(RecommendationArgs):
    ids = IdList(max_items=20)


class PropertiesArgs(Schema):
    class Meta:
        unknown = EXCLUDE

    keys = IdList()


class MembershipArgs(Schema):
    class Meta:
        unknown = EXCLUDE

    default = fields.Boolean(truthy={"true"}, falsy={"false"})


class PredictionArgs(Schema):
    class Meta:
        unknown = EXCLUDE

    type = fields.String(validate=OneOf(["score", "pct"]))


def load_args(schema: Schema, args: Mapping[str, str]) -> dict[str, Any]:
    """Validate *args* with *schema*; the first problem becomes a 400 naming its field."""
    try:
        return schema.load(args)
    except ValidationError as exc:
        name, detail = first_problem(exc)
        raise InvalidRequest(name, detail.rstrip(".").lower()) from None
