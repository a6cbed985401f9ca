"""Hostile paths and queries: exact request targets, a table of expected answers, and properties.

Every request here is sent byte for byte (``http.client`` or a raw socket): ``requests``
would normalise ``..`` segments and re-quote percent escapes before they reach the service.
"""

from __future__ import annotations

import http.client
import socket
import time
import unicodedata
from itertools import count
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from app.core.query import Identity
from simulator import data
from tests.conftest import BRAZE_KEY

AUTH = {"Authorization": f"Bearer {BRAZE_KEY}"}

#: Every parameter name the service may send Amplitude.
UPSTREAM_PARAMS = frozenset(
    {
        "user_id",
        "device_id",
        "get_amp_props",
        "get_computations",
        "get_cohort_ids",
        "get_recs",
        "rec_id",
        "rec_type",
        "get_propensity",
        "prediction_id",
        "propensity_type",
    }
)
IDENTITY_PARAMS = ("user_id", "device_id")
KIND_FIELD = {"users": "user_id", "devices": "device_id"}


class Answer:
    """One response, read whole."""

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:200]!r}>"


def raw_get(url: str, target: str, headers: dict[str, str] | None = AUTH) -> Answer:
    """GET *target* exactly as given (printable ASCII only: ``http.client`` refuses the rest)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        conn.close()


def socket_get(url: str, target: bytes) -> Answer:
    """GET a request target holding arbitrary bytes, over a raw socket."""
    parts = urlsplit(url)
    request = b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    request += f"Authorization: Bearer {BRAZE_KEY}\r\n\r\n".encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(request)
        raw = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


def assert_json_contract(answer: Answer) -> dict[str, Any]:
    """Not a 5xx; a JSON object; errors with ``error`` and ``message``; nosniff."""
    assert answer.status < 500, answer
    body = answer.json()
    assert isinstance(body, dict), answer
    if answer.status >= 400:
        assert isinstance(body.get("error"), str) and body["error"], answer
        assert isinstance(body.get("message"), str) and body["message"], answer
    nosniff = answer.headers.get("X-Content-Type-Options") or answer.headers.get("x-content-type-options")
    assert nosniff == "nosniff", answer
    return body


# -- the table ----------------------------------------------------------------------------------

LONG_ID = "a" * 10_000
OVERLONG_QUERY = "keys=" + "k" * 8200

HOSTILE = [
    # path traversal
    ("/v1/users/../properties", 400, "user_id"),
    ("/v1/devices/../cohorts", 400, "device_id"),
    ("/v1/users/./properties", 400, "user_id"),
    ("/v1/users/%2E%2E/properties", 400, "user_id"),
    ("/v1/users/%2e%2E/properties", 400, "user_id"),
    ("/v1/users/%2E/properties", 400, "user_id"),
    ("/v1/users/user-1/properties/..", 400, "name"),
    ("/v1/users/user-1/properties/%2E%2E", 400, "name"),
    ("/v1/users/user-1/recommendations/..", 400, "rec_id"),
    ("/v1/users/user-1/cohorts/%2E%2E", 400, "cohort_id"),
    ("/v1/users/user-1/predictions/.", 400, "prediction_id"),
    ("/v1/users/user-1/../user-2/properties", 404, None),
    ("/v1/users/../../etc/passwd", 404, None),
    ("/v1/users/..%2F..%2F..%2Fetc%2Fpasswd/..", 400, "name_or_404"),
    # CR/LF (header injection) in ids and query values
    ("/v1/users/a%0D%0Ab/properties", 400, "user_id"),
    ("/v1/users/user-1%0D%0ASet-Cookie:%20x=1/properties", 400, "user_id"),
    ("/v1/users/user-1%0A/cohorts", 400, "user_id"),
    ("/v1/users/user-1/recommendations/rec_home%0D%0A", 400, "rec_id"),
    ("/v1/users/user-1/recommendations/rec_home?default=a%0D%0Ab", 400, "default"),
    ("/v1/users/user-1/recommendations/rec_home?rec_type=model%0D%0A", 400, "rec_type"),
    ("/v1/users/user-1/recommendations/rec_home?limit=1%0D%0A", 400, "limit"),
    ("/v1/users/user-1/recommendations/rec_home?limit=%0B5", 400, "limit"),
    ("/v1/users/user-1/recommendations?ids=rec_home,%0D%0Arec_email", 400, "ids"),
    ("/v1/users/user-1/properties?keys=plan%0D%0AX-Injected:%201", 400, "keys"),
    ("/v1/users/user-1/predictions/p1?type=score%0D%0A", 400, "type"),
    # NUL
    ("/v1/users/a%00b/properties", 400, "user_id"),
    ("/v1/users/%00/cohorts", 400, "user_id"),
    ("/v1/users/user-1/cohorts/c%00", 400, "cohort_id"),
    ("/v1/users/user-1/properties?keys=a%00", 400, "keys"),
    ("/v1/users/user-1/recommendations/rec_home?default=sku%00", 400, "default"),
    # bidirectional overrides and other invisible direction marks
    ("/v1/users/%E2%80%AEuser-1/properties", 400, "user_id"),
    ("/v1/devices/abc%E2%80%AEfdp.exe/cohorts", 400, "device_id"),
    ("/v1/users/user-1%E2%81%A6/properties", 400, "user_id"),
    # (non-ASCII in a query value: the field named may be the value's or the whole query's)
    ("/v1/users/user-1/properties?keys=%E2%80%AEnalp", 400, ("keys", "query")),
    ("/v1/users/user-1/recommendations/rec_home?default=%E2%80%AEsku", 400, ("default", "query")),
    # length
    (f"/v1/users/{LONG_ID}/properties", 400, "user_id"),
    (f"/v1/devices/{LONG_ID}/cohorts", 400, "device_id"),
    (f"/v1/users/user-1/properties/{LONG_ID}", 400, "name"),
    (f"/v1/users/user-1/properties?{OVERLONG_QUERY}", 400, "query"),
    (f"/v1/users/user-1/cohorts?{OVERLONG_QUERY}", 400, "query"),
    ("/v1/users/user-1/cohorts?" + "&".join(f"p{n}=1" for n in range(2000)), 400, "query"),
    # empty ids: the route does not match (404) or the id is refused (400), as JSON
    ("/v1/users//properties", (400, 404), None),
    ("/v1/devices//cohorts", (400, 404), None),
    ("/v1/users//recommendations/rec_home", (400, 404), None),
    ("/v1/users/user-1/cohorts/", 404, None),
    # repeated parameters
    ("/v1/users/user-1/recommendations/rec_home?limit=1&limit=2", 400, "limit"),
    ("/v1/users/user-1/recommendations/rec_home?limit=1&limit=1", 400, "limit"),
    ("/v1/users/user-1/recommendations?ids=rec_home&ids=rec_email", 400, "ids"),
    ("/v1/users/user-1/properties?keys=a&keys=b", 400, "keys"),
    ("/v1/users/user-1/cohorts?limit=1&limit=2", 400, "limit"),
    # invalid UTF-8, in the path and in the query
    ("/v1/users/%FF/properties", 400, "user_id"),
    ("/v1/users/user-%C3/properties", 400, "user_id"),
    ("/v1/users/%C0%AE%C0%AE/properties", 400, "user_id"),  # overlong encoding of ".."
    ("/v1/users/%ED%A0%80/properties", 400, "user_id"),  # an encoded lone surrogate
    ("/v1/users/user-1/recommendations/%C0%AF", 400, "rec_id"),
    ("/v1/users/user-1/properties?keys=%FF", 400, "query"),
    ("/v1/users/user-1/properties?%FF=1", 400, "query"),
    ("/v1/users/user-1/cohorts?x=%FF", 400, "query"),
    ("/v1/users/user-1/recommendations/rec_home?default=%C0%AF", 400, "query"),
]


@pytest.mark.parametrize(
    ("target", "status", "field"), HOSTILE, ids=lambda v: str(v)[:60] if isinstance(v, str) else None
)
def test_hostile_request_is_refused_without_calling_upstream(service, sim, target, status, field):
    answer = raw_get(service.url, target)
    body = assert_json_contract(answer)
    expected = status if isinstance(status, tuple) else (status,)
    if field == "name_or_404":
        expected, field = (400, 404), None
    assert answer.status in expected, answer
    if field is not None:
        assert body["error"] == "invalid_request"
        assert body["field"] in (field if isinstance(field, tuple) else (field,)), body
    assert answer.headers["Cache-Control"] == "no-store"
    assert sim.calls == 0


RAW_TARGETS = [
    b"/v1/users/\xff/properties",
    b"/v1/users/\xc3/properties",
    b"/v1/users/\xe2\x80\xae1-resu/properties",
    b"/v1/users/a\x00b/properties",
    b"/v1/users/a\x1bb/cohorts",
    b"/v1/users/a\x7fb/cohorts",
    b"/v1/users/user-1/properties?keys=\xff",
    b"/v1/users/<script>\xff</script>/cohorts",
    b"/v1/users/us\xd0\xb5r-1/properties",  # even valid UTF-8 must be percent-encoded
]


def test_raw_bytes_in_the_request_target_are_refused_under_gunicorn(gunicorn_service, sim):
    """Bytes outside printable ASCII, not percent-encoded, as the production server receives them.

    gunicorn refuses such a request line itself (its own HTML 400, before the app runs);
    whatever answers, it is a 400, nothing reaches Amplitude and nothing is reflected raw.
    (werkzeug's development server re-encodes the request line instead, so this runs under
    gunicorn.)
    """
    service = gunicorn_service()
    outcomes = {target: socket_get(service.url, target) for target in RAW_TARGETS}
    for target, answer in outcomes.items():
        assert answer.status == 400, (target, answer)
        assert b"<script>" not in answer.body, (target, answer)
        if answer.body.startswith(b"{"):
            assert_json_contract(answer)
    assert sim.calls == 0
    # The same ids, percent-encoded as Braze's url_param_escape does, are served.
    answer = raw_get(service.url, "/v1/users/us%D0%B5r-1/properties")
    assert answer.status == 200 and answer.json()["user_id"] == "us\u0435r-1"
    assert sim.calls == 1


def test_hostile_requests_without_a_key_are_401_not_400(service, sim):
    for target in ("/v1/users/../properties", "/v1/users/a%0D%0Ab/properties", f"/v1/users/{LONG_ID}/cohorts"):
        answer = raw_get(service.url, target, headers={})
        assert answer.status == 401 and assert_json_contract(answer)["error"] == "unauthorized"
    assert sim.calls == 0


def test_an_encoded_slash_id_stays_one_opaque_value(service, sim):
    """``..%2F..%2Fetc`` is the id ``../../etc``: legal (ids may hold ``/``), sent only as a query value."""
    answer = raw_get(service.url, "/v1/users/..%2F..%2Fetc/properties")
    body = assert_json_contract(answer)
    assert answer.status == 200 and body["user_id"] == "../../etc"
    assert sim.calls == 1
    (recorded,) = sim.requests
    assert recorded.path == "/v1/userprofile"
    assert [value for name, value in recorded.params if name in IDENTITY_PARAMS] == ["../../etc"]
    assert "/" not in recorded.raw_query.split("user_id=", 1)[1].split("&", 1)[0]


HOMOGLYPHS = [
    "usеr-1",  # Cyrillic е (U+0435)
    "user-1",  # the Latin original, for contrast
    "раypal-1",  # Cyrillic р and а
    "ѕeсurity-42",  # Cyrillic ѕ and с
    "ΑΒΓ-1",  # Greek capitals that look Latin
    "ｕｓｅｒ-1",  # fullwidth forms
]


def test_homoglyph_ids_are_distinct_valid_ids(service, sim):
    bodies = {}
    for n, identity in enumerate(HOMOGLYPHS, 1):
        answer = raw_get(service.url, f"/v1/users/{quote(identity, safe='')}/properties")
        body = assert_json_contract(answer)
        assert answer.status == 200, answer
        assert body["user_id"] == identity
        assert body["properties"] == {
            **data.user_properties("user", identity),
            **data.computations("user", identity, None),
        }
        assert sim.calls == n  # one upstream call each: no two of them share a cache entry
        assert [v for k, v in sim.requests[-1].params if k in IDENTITY_PARAMS] == [identity]
        bodies[identity] = body
    # Asked again, each is answered from its own cache entry.
    for identity in HOMOGLYPHS:
        answer = raw_get(service.url, f"/v1/users/{quote(identity, safe='')}/properties")
        assert answer.status == 200 and answer.json() == bodies[identity]
    assert sim.calls == len(HOMOGLYPHS)


# -- properties -----------------------------------------------------------------------------------

ROUTES = ["properties", "cohorts", "recommendations/rec_home", "", "predictions/pred_churn", "properties/plan"]
HYPOTHESIS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Characters that make ids interesting: separators, escapes, dots, controls, marks, homoglyphs.
TRICKY = st.sampled_from(
    list("/\\.%?#&=+;: \t\r\n\x00\x7f\x85\u200b\u200e\u202e\u2066\ufeff\u2028еа") + ["..", "%2F", "%00"]
)
PRINTABLE = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=12)
IDS = (
    st.lists(st.one_of(PRINTABLE, PRINTABLE, st.text(max_size=6), TRICKY), min_size=1, max_size=5)
    .map("".join)
    .filter(bool)
)


def _must_refuse(identity: str) -> bool:
    return (
        any(unicodedata.category(c) == "Cc" for c in identity)
        or identity in (".", "..")
        or len(identity.encode("utf-8")) > 1024
    )


def _must_accept(identity: str) -> bool:
    # Format characters (Cf: direction marks, BOM, zero-width) may go either way.
    return not _must_refuse(identity) and not any(unicodedata.category(c) == "Cf" for c in identity)


def _check_upstream_calls(sim, before: int, id_field: str, identity: str) -> int:
    new = sim.requests[before:]
    for recorded in new:
        assert recorded.path == "/v1/userprofile"
        names = [name for name, _ in recorded.params]
        assert set(names) <= UPSTREAM_PARAMS, names
        assert len(names) == len(set(names)), names
        identities = [(name, value) for name, value in recorded.params if name in IDENTITY_PARAMS]
        assert identities == [(id_field, identity)], (identities, identity)
    return len(new)


@HYPOTHESIS
@given(identity=IDS, kind=st.sampled_from(["users", "devices"]), route=st.sampled_from(ROUTES))
def test_any_id_is_refused_or_passed_through_exactly(service, sim, identity, kind, route):
    # Empty ids are in the table above; here every id has at least one character.
    target = f"/v1/{kind}/{quote(identity, safe='')}" + (f"/{route}" if route else "")
    before = sim.calls
    answer = raw_get(service.url, target)
    body = assert_json_contract(answer)
    id_field = KIND_FIELD[kind]
    calls = _check_upstream_calls(sim, before, id_field, identity)
    event(f"status {answer.status}, {calls} upstream call(s)")
    assert calls <= 1
    if _must_refuse(identity):
        assert answer.status == 400 and body["field"] == id_field, answer
    if answer.status == 400:
        assert calls == 0
        return
    if _must_accept(identity):
        assert answer.status in (200, 404), answer
    if Identity(id_field, identity).never_stored:
        # An id Amplitude refuses to store: not found, with no call and no budget spent.
        assert (answer.status, body["error"], calls) == (404, "user_not_found", 0), answer
        return
    if answer.status == 404:
        known_missing = identity.startswith("unknown") or (
            route.startswith("recommendations") and identity.startswith(("new-", "inactive-"))
        )
        assert known_missing and body["error"] in ("user_not_found", "no_recommendations"), answer
        return
    assert answer.status == 200, answer
    # The answer is about the id asked for, never another one's data.
    assert body[id_field] == identity
    sim_kind = kind[:-1]
    if route == "properties":
        expected = {**data.user_properties(sim_kind, identity), **data.computations(sim_kind, identity, None)}
        assert body["properties"] == expected
    elif route == "cohorts":
        assert body["cohort_ids"] == data.cohort_ids(sim_kind, identity)
    elif route.startswith("recommendations"):
        assert body["items"] == data.recommendation(sim_kind, identity, "rec_home", None)["items"]


QUERY_NAMES = st.sampled_from(
    ["limit", "rec_type", "default", "ids", "keys", "type", "user_id", "device_id", "get_recs", "rec_id",
     "prediction_id", "comp_id", "propensity_type", "api_key", ""]
)  # fmt: skip
QUERY_VALUES = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
    st.text(max_size=10),
    st.sampled_from(["1", "100", "101", "0", "-1", "model", "random", "score", "pct", "rec_home,rec_email",
                     "a,b", "", ",", "user-2", "true"]),
)  # fmt: skip
RAW_FRAGMENTS = st.sampled_from(["%", "%F", "%FF", "%G1", "%C0%AF", "%00", "&&", "=", "==", "+", ";", "a=b=c", "%26"])


@st.composite
def query_strings(draw: Any) -> str:
    parts = []
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        if draw(st.integers(min_value=0, max_value=4)) == 0:
            parts.append(draw(RAW_FRAGMENTS))
        else:
            name = draw(st.one_of(QUERY_NAMES, st.text(max_size=8)))
            parts.append(quote(name, safe="") + "=" + quote(draw(QUERY_VALUES), safe=""))
    return "&".join(parts)


_serial = count()


@HYPOTHESIS
@given(query=query_strings(), kind=st.sampled_from(["users", "devices"]), route=st.sampled_from(ROUTES[:5]))
def test_any_query_string_never_breaks_the_service_or_the_upstream_call(service, sim, query, kind, route):
    identity = f"user-q{next(_serial)}"  # a new id each time, so the query decides the upstream call
    target = f"/v1/{kind}/{identity}" + (f"/{route}" if route else "") + "?" + query
    before = sim.calls
    answer = raw_get(service.url, target)
    body = assert_json_contract(answer)
    id_field = KIND_FIELD[kind]
    calls = _check_upstream_calls(sim, before, id_field, identity)
    event(f"status {answer.status}, {calls} upstream call(s)")
    assert calls <= 1
    if answer.status == 400:
        assert calls == 0 and body["error"] == "invalid_request" and "field" in body
    else:
        assert answer.status in (200, 404), answer
        assert body[id_field] == identity
    for recorded in sim.requests[before:]:
        params = dict(recorded.params)
        assert params.get("rec_type", "model") in ("model", "random")
        assert params.get("propensity_type", "score") in ("score", "pct")
        assert "api_key" not in params and "comp_id" not in params


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/v1/users/user-1/properties?keys=pr%C3%A9nom,plan", {"prénom", "plan"}),
        ("/v1/users/unknown-1/recommendations/rec_home?default=caf%C3%A9,sku-1", ["café", "sku-1"]),
        ("/v1/users/user-1/cohorts?utm_campaign=%E2%9C%93", None),
    ],
    ids=["keys", "default", "ignored-parameter"],
)
def test_valid_utf8_in_query_values_is_accepted(service, sim, target, expected):
    answer = raw_get(service.url, target)
    body = assert_json_contract(answer)
    assert answer.status == 200, answer
    if isinstance(expected, set):
        assert set(body["properties"]) == expected and body["properties"]["prénom"] is None
    elif isinstance(expected, list):
        assert body["items"] == expected and body["fallback"] is True


KEY_TEXT = st.text(
    alphabet=st.characters(blacklist_characters=",", blacklist_categories=("Cs",)), min_size=1, max_size=10
)


@HYPOTHESIS
@given(
    keys=st.lists(
        st.one_of(KEY_TEXT, st.sampled_from(["plan", "city", " plan ", "first_name"])), min_size=1, max_size=5
    )
)
def test_any_keys_list_is_refused_or_answered_exactly(service, sim, keys):
    answer = raw_get(service.url, "/v1/users/user-keys/properties?keys=" + quote(",".join(keys), safe=""))
    body = assert_json_contract(answer)
    stripped = [key.strip(" ") for key in keys]
    if any(not key or _must_refuse(key) for key in stripped):
        assert answer.status == 400 and body["field"] in ("keys", "query"), answer
        return
    if all(_must_accept(key) for key in stripped):
        assert answer.status == 200, answer
    if answer.status == 200:
        props = {**data.user_properties("user", "user-keys"), **data.computations("user", "user-keys", None)}
        assert body["properties"] == {key: props.get(key) for key in stripped}
    else:
        assert answer.status == 400 and body["field"] in ("keys", "query"), answer
    assert sim.calls <= 1
