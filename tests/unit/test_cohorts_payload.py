"""The Cohort Webhooks payload: Amplitude's default shape accepted, everything malformed refused by field."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.cohorts.errors import InvalidBatch
from app.cohorts.payload import MAX_BODY_BYTES, MAX_PROPERTIES, MAX_USERS, CohortBatch, parse_batch
from app.errors import render_error

DOCUMENTED = {  # Amplitude's documented example
    "cohort_name": "My Test Cohort",
    "cohort_id": "7khm89cz",
    "in_cohort": True,
    "computed_time": "1692206763",
    "message_id": "9baaa88f-9d46-4ee5-a946-be0c6aea0046::enter::0",
    "users": [
        {"user_id": "user_one@example.com"},
        {"user_id": "user_two@example.com", "user_properties": {"plan": "pro"}},
    ],
}


def body(**changes: Any) -> bytes:
    payload = {**DOCUMENTED, **changes}
    return orjson.dumps({key: value for key, value in payload.items() if value is not ...})


def test_the_documented_example():
    batch = parse_batch(body())
    assert batch == CohortBatch(
        "7khm89cz", "My Test Cohort", True, 1692206763, DOCUMENTED["message_id"],
        ("user_one@example.com", "user_two@example.com"),
    )  # fmt: skip


def test_what_a_template_may_change_is_accepted():
    batch = parse_batch(body(computed_time=1692206763, cohort_name=..., extra={"x": 1}, in_cohort=False))
    assert (batch.computed_time, batch.cohort_name, batch.in_cohort) == (1692206763, None, False)


def test_a_user_named_twice_is_one_change():
    users = [{"user_id": "a"}, {"user_id": "b"}, {"user_id": "a"}]
    assert parse_batch(body(users=users)).user_ids == ("a", "b")


def test_queued_form_keeps_everything_but_the_properties():
    batch = parse_batch(body())
    queued = batch.queued_form()
    assert b"plan" not in queued
    assert CohortBatch.from_queued(queued) == batch


LONG = "x" * 1025


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"", "body"),
        (b"not json", "body"),
        (b"[1, 2]", "body"),
        (b"\xff\xfe{}", "body"),
        (body(cohort_id=...), "cohort_id"),
        (body(cohort_id=""), "cohort_id"),
        (body(cohort_id="a" * 129), "cohort_id"),
        (body(cohort_id="vip\n"), "cohort_id"),
        (body(cohort_id="vip\u202e"), "cohort_id"),  # a bidirectional override
        (body(cohort_id=7), "cohort_id"),
        (body(cohort_name=LONG), "cohort_name"),
        (body(in_cohort="true"), "in_cohort"),
        (body(in_cohort=1), "in_cohort"),
        (body(in_cohort=...), "in_cohort"),
        (body(computed_time="1692206763.5"), "computed_time"),
        (body(computed_time="-1692206763"), "computed_time"),
        (body(computed_time=" 1692206763"), "computed_time"),
        (body(computed_time="16922067630000"), "computed_time"),  # milliseconds
        (body(computed_time="0"), "computed_time"),
        (body(computed_time=True), "computed_time"),
        (body(computed_time=1692206763.0), "computed_time"),
        (body(computed_time="١٢٣"), "computed_time"),  # digits, but not ASCII ones
        (body(message_id=...), "message_id"),
        (body(message_id="m" * 257), "message_id"),
        (body(users=[]), "users"),
        (body(users={"user_id": "a"}), "users"),
        (body(users=["a"]), "users"),
        (body(users=[{"device_id": "d"}]), "users"),  # only users with a user_id are sent
        (body(users=[{"user_id": ""}]), "users"),
        (body(users=[{"user_id": None}]), "users"),
        (body(users=[{"user_id": "u\x00"}]), "users"),
        (body(users=[{"user_id": "x" * 1025}]), "users"),
        (body(users=[{"user_id": "u", "user_properties": [1]}]), "users"),
        (body(users=[{"user_id": "u", "user_properties": {f"p{n}": n for n in range(MAX_PROPERTIES + 1)}}]), "users"),
        (body(users=[{"user_id": "u", "user_properties": {LONG: 1}}]), "users"),
        (body(users=[{"user_id": f"u{n}"} for n in range(MAX_USERS + 1)]), "users"),
    ],
)
def test_malformed_batches_are_refused_naming_the_field(raw, field):
    with pytest.raises(InvalidBatch) as caught:
        parse_batch(raw)
    response = render_error(caught.value)
    assert response.status_code == 400
    assert orjson.loads(response.get_data()) == {
        "error": "invalid_request", "field": field, "message": caught.value.message
    }  # fmt: skip
    assert caught.value.message.startswith(f"{field}: ")


def test_the_first_bad_user_is_named_without_echoing_its_id():
    users = [{"user_id": "fine"}, {"user_id": "secret\x07id"}]
    with pytest.raises(InvalidBatch) as caught:
        parse_batch(body(users=users))
    assert "user 1" in caught.value.message and "secret" not in caught.value.message


def test_the_body_bound_fits_a_thousand_users_with_fifty_properties_each():
    # Property names and values of the length Amplitude's usually have, with room to spare.
    properties = {f"gp:property_{n:02d}": f"value of property {n:02d} for this user" for n in range(MAX_PROPERTIES)}
    users = [{"user_id": f"user-{n:08d}@example.com", "user_properties": properties} for n in range(1000)]
    raw = body(users=users)
    assert 2 * len(raw) < MAX_BODY_BYTES
    assert len(parse_batch(raw).user_ids) == 1000
