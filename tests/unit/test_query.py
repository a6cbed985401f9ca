"""Query planning: which Amplitude request answers a route, and its cache key."""

from __future__ import annotations

from app.core.query import Identity, QueryPlanner
from app.settings import Settings

SETTINGS = Settings(
    amplitude_secret_key="unit-test-key",
    profile_rec_ids=("rec_home", "rec_email"),
    profile_prediction_ids=("pred_churn",),
)
PLANNER = QueryPlanner(SETTINGS)
USER = Identity("user_id", "user-42")


def test_routes_inside_the_configured_profile_share_one_query():
    whole = PLANNER.whole(USER)
    assert PLANNER.recommendations(USER, ("rec_email",), None) == whole
    assert PLANNER.recommendations(USER, ("rec_home", "rec_email"), None) == whole
    assert PLANNER.prediction(USER, "pred_churn", "score") == whole


def test_anything_outside_it_gets_a_narrower_query_of_its_own():
    whole = PLANNER.whole(USER)
    for query in (
        PLANNER.recommendations(USER, ("rec_cart",), None),
        PLANNER.recommendations(USER, ("rec_home",), "random"),
        PLANNER.prediction(USER, "pred_other", "score"),
        PLANNER.prediction(USER, "pred_churn", "pct"),
    ):
        assert query != whole and query.cache_key != whole.cache_key


def test_cache_keys_ignore_order_and_duplicates_and_hold_no_raw_id():
    first = PLANNER.recommendations(USER, ("rec_cart", "rec_x"), None)
    second = PLANNER.recommendations(USER, ("rec_x", "rec_cart", "rec_x"), None)
    assert first.cache_key == second.cache_key
    assert "user-42" not in first.cache_key


def test_users_and_devices_never_share_keys_and_not_found_is_per_identity():
    device = Identity("device_id", "user-42")
    assert PLANNER.whole(USER).cache_key != PLANNER.whole(device).cache_key
    assert PLANNER.whole(USER).negative_key == PLANNER.prediction(USER, "p2", "pct").negative_key
    assert PLANNER.whole(USER).negative_key != PLANNER.whole(device).negative_key


def test_the_whole_profile_asks_for_everything_in_one_request():
    params = dict(PLANNER.whole(USER).upstream_params())
    assert params == {
        "user_id": "user-42",
        "get_amp_props": "true",
        "get_computations": "true",
        "get_cohort_ids": "true",
        "get_recs": "true",
        "rec_id": "rec_email,rec_home",
        "get_propensity": "true",
        "prediction_id": "pred_churn",
        "propensity_type": "score",
    }


def test_the_query_string_keeps_any_id_whole_and_lists_as_commas():
    from urllib.parse import parse_qs

    for value in ("a&user_id=b", "x#y", "a/b", "a,b", "a b+c", "café", "100%"):
        query = PLANNER.whole(Identity("user_id", value)).upstream_query()
        parsed = parse_qs(query, keep_blank_values=True, strict_parsing=True)
        assert parsed["user_id"] == [value]
        assert parsed["rec_id"] == ["rec_email,rec_home"]
    assert "rec_id=rec_email,rec_home" in PLANNER.whole(USER).upstream_query()  # no %2C: one less re-encoding
    assert PLANNER.whole(Identity("user_id", "a,b")).upstream_query().startswith("user_id=a%2Cb&")


def test_equal_queries_share_their_keys():
    again = PLANNER.whole(Identity("user_id", "user-42"))
    assert again == PLANNER.whole(USER) and again.cache_key == PLANNER.whole(USER).cache_key
    assert USER.cache_token == Identity("user_id", "user-42").cache_token
