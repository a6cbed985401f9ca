"""Amplitude's default Cohort Webhooks payload: its schema, its bounds, and the form it is queued in.

Amplitude lets a customer reshape the payload with a FreeMarker template; the service
accepts the default shape only (``computed_time`` may also arrive as a bare number, which a
template leaving out its quotes produces), and ignores keys it does not know so that a field
Amplitude adds later does not turn every batch into a refusal and a retry.

Validation is all or nothing and runs before anything is queued: a malformed batch is
answered ``400`` and changes nothing. The user list is checked in one tight loop rather
than by a nested schema, since a 1,000-user batch must be queued within a second on a
loaded machine. User properties are checked for their bounds, then dropped: see
:mod:`app.cohorts` for why they are never served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from marshmallow import EXCLUDE, Schema, ValidationError, fields

from app.cohorts.errors import InvalidBatch
from app.errors import InvalidRequest
from app.http.params import check_text
from app.settings import MAX_COHORT_ID_BYTES, first_problem

#: Users one batch may carry. Amplitude batches about 1,000; a refusal would be retried
#: forever and stall the cohort, so the bound leaves ten times that.
MAX_USERS = 10_000
#: Properties one user may carry: Amplitude sends at most 50.
MAX_PROPERTIES = 50
MAX_NAME_BYTES = 1024
MAX_MESSAGE_ID_BYTES = 256
MAX_PROPERTY_NAME_BYTES = 1024
#: Epoch seconds fit in ten digits until the year 2286; more is milliseconds or junk.
MAX_COMPUTED_TIME = 9_999_999_999
#: The body size the receiver enforces (the route should also set it as the request's
#: limit, so a larger body is refused before it is read). A 1,000-user batch with 50
#: properties per user is 50,000 properties: 8 MiB leaves about 165 bytes for each name,
#: value and their JSON punctuation, two to four times what Amplitude's property names and
#: values usually take (``"gp:plan":"enterprise",`` is 23), and a 10,000-user batch without
#: properties takes under 1 MiB. Parsed, 8 MiB of JSON is tens of MB for one request, once.
MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class CohortBatch:
    """One validated batch: users entering (``in_cohort``) or leaving one cohort, as of ``computed_time``."""

    cohort_id: str
    cohort_name: str | None
    in_cohort: bool
    computed_time: int
    message_id: str
    user_ids: tuple[str, ...]

    def queued_form(self) -> bytes:
        """The batch as it is queued: compact JSON without the properties (the service keeps none)."""
        return orjson.dumps(
            {"cohort_id": self.cohort_id, "cohort_name": self.cohort_name, "in_cohort": self.in_cohort,
             "computed_time": self.computed_time, "message_id": self.message_id, "users": self.user_ids}
        )  # fmt: skip

    @classmethod
    def from_queued(cls, raw: bytes) -> CohortBatch:
        """Read back :meth:`queued_form` (written by this service, after validation)."""
        data = orjson.loads(raw)
        return cls(
            data["cohort_id"], data["cohort_name"], bool(data["in_cohort"]), int(data["computed_time"]),
            data["message_id"], tuple(data["users"]),
        )  # fmt: skip


class _Text(fields.String):
    """An id checked like the service's path ids: non-empty, bounded, no control or bidi characters."""

    def __init__(self, max_bytes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_bytes = max_bytes

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        return _checked(text, self.max_bytes)


class _StrictBool(fields.Boolean):
    """``true`` or ``false`` as JSON booleans: not ``"true"``, ``1`` or ``"yes"``."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise ValidationError("must be true or false")
        return value


class _EpochSeconds(fields.Field):
    """Epoch seconds as a string of digits (Amplitude's form), or as a whole JSON number."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
            seconds = int(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            seconds = value
        else:
            raise ValidationError("must be epoch seconds written with digits only")
        if not 0 < seconds <= MAX_COMPUTED_TIME:
            raise ValidationError(f"must be epoch seconds between 1 and {MAX_COMPUTED_TIME}")
        return seconds


class _Users(fields.Field):
    """The batch's users: ``[{"user_id": ..., "user_properties": {...}?}]``, read in one loop."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ValidationError("must be a list of users")
        if not 1 <= len(value) <= MAX_USERS:
            raise ValidationError(f"must hold between 1 and {MAX_USERS} users")
        user_ids: list[str] = []
        for position, user in enumerate(value):
            if not isinstance(user, dict):
                raise ValidationError(f"user {position} must be an object")
            user_id = user.get("user_id")
            if not isinstance(user_id, str):
                raise ValidationError(f"user {position}: user_id must be a string (only users with one are sent)")
            try:
                user_ids.append(check_text("user_id", user_id))
            except InvalidRequest as exc:
                raise ValidationError(f"user {position}: {exc.message}") from None
            _check_properties(position, user.get("user_properties"))
        # A user named twice in one batch is one change: keep the first mention's place.
        return tuple(dict.fromkeys(user_ids))


def _check_properties(position: int, properties: Any) -> None:
    if properties is None:
        return
    if not isinstance(properties, dict):
        raise ValidationError(f"user {position}: user_properties must be an object")
    if len(properties) > MAX_PROPERTIES:
        raise ValidationError(f"user {position}: user_properties must hold at most {MAX_PROPERTIES} properties")
    for name in properties:
        if len(name) > MAX_PROPERTY_NAME_BYTES or len(name.encode("utf-8", "surrogatepass")) > MAX_PROPERTY_NAME_BYTES:
            raise ValidationError(f"user {position}: a property name is longer than {MAX_PROPERTY_NAME_BYTES} bytes")


def _checked(text: str, max_bytes: int) -> str:
    try:
        return check_text("value", text, max_bytes)
    except InvalidRequest as exc:
        raise ValidationError(exc.message.split(": ", 1)[-1]) from None


class CohortBatchSchema(Schema):
    """Amplitude's default Cohort Webhooks payload (unknown keys are ignored)."""

    class Meta:
        unknown = EXCLUDE

    cohort_id = _Text(MAX_COHORT_ID_BYTES, required=True)
    cohort_name = _Text(MAX_NAME_BYTES, load_default=None, allow_none=True)
    in_cohort = _StrictBool(required=True)
    computed_time = _EpochSeconds(required=True)
    message_id = _Text(MAX_MESSAGE_ID_BYTES, required=True)
    users = _Users(required=True)


_SCHEMA = CohortBatchSchema()


def parse_batch(body: bytes) -> CohortBatch:
    """Validate a webhook body (already bounded in size) into a :class:`CohortBatch`.

    :raises InvalidBatch: naming the first bad field; nothing has been changed.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidBatch("body", "must be a JSON object (UTF-8)") from None
    if not isinstance(payload, dict):
        raise InvalidBatch("body", "must be a JSON object")
    try:
        loaded = _SCHEMA.load(payload)
    except ValidationError as exc:
        name, detail = first_problem(exc)
        detail = detail.rstrip(".")
        raise InvalidBatch(name, detail[:1].lower() + detail[1:]) from None
    return CohortBatch(
        cohort_id=loaded["cohort_id"],
        cohort_name=loaded["cohort_name"],
        in_cohort=loaded["in_cohort"],
        computed_time=loaded["computed_time"],
        message_id=loaded["message_id"],
        user_ids=loaded["users"],
    )
