"""The cohort settings: defaults, every bad value named, and secrets kept apart from caller keys."""

from __future__ import annotations

import pytest

from app.cohorts.settings import CohortSettings
from app.settings import SettingsError, load_settings

SECRET = "cohort-webhook-secret-0001"
BASE = {"AMPLITUDE_SECRET_KEY": "k", "PROXY_API_KEYS": "braze:test-key-braze-0001"}


def cohort_settings(**environ: str) -> CohortSettings:
    return CohortSettings.from_settings(load_settings({**BASE, **environ}))


def test_defaults():
    settings = cohort_settings()
    assert settings == CohortSettings()
    assert (settings.settle_seconds, settings.realtime_max_silence_seconds) == (300.0, 900.0)
    assert not settings.receiver_enabled


def test_values():
    settings = cohort_settings(
        COHORT_WEBHOOK_SECRETS=f" {SECRET} , {SECRET}-next", COHORT_SETTLE_SECONDS="120",
        COHORT_REALTIME_IDS="7khm89cz, abc123", COHORT_REALTIME_MAX_SILENCE_SECONDS="600",
    )  # fmt: skip
    assert settings.webhook_secrets == (SECRET, f"{SECRET}-next")
    assert (settings.settle_seconds, settings.realtime_ids) == (120.0, ("7khm89cz", "abc123"))
    assert settings.realtime_max_silence_seconds == 600.0 and settings.receiver_enabled


def test_secrets_never_show():
    assert SECRET not in repr(cohort_settings(COHORT_WEBHOOK_SECRETS=SECRET))
    assert SECRET not in repr(load_settings({**BASE, "COHORT_WEBHOOK_SECRETS": SECRET}))


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("COHORT_WEBHOOK_SECRETS", "short"),
        ("COHORT_WEBHOOK_SECRETS", f"{SECRET},{SECRET}"),
        ("COHORT_WEBHOOK_SECRETS", "cohort webhook secret 1"),
        ("COHORT_WEBHOOK_SECRETS", ",".join(f"{SECRET}-{n}" for n in range(6))),
        ("COHORT_SETTLE_SECONDS", "0"),
        ("COHORT_SETTLE_SECONDS", "soon"),
        ("COHORT_REALTIME_IDS", "a,a"),
        ("COHORT_REALTIME_IDS", "x" * 200),
        ("COHORT_REALTIME_MAX_SILENCE_SECONDS", "10"),
        ("AMPLITUDE_REGION", "mars"),
    ],
)
def test_a_bad_value_names_its_variable_and_not_the_value(variable, value):
    with pytest.raises(SettingsError) as caught:
        load_settings({**BASE, variable: value})
    assert str(caught.value).startswith(f"{variable}: ")
    if variable == "COHORT_WEBHOOK_SECRETS":
        assert SECRET not in str(caught.value)


@pytest.mark.parametrize("variable", ["PROXY_API_KEYS", "ADMIN_API_KEYS"])
def test_a_webhook_secret_may_not_be_a_caller_or_admin_key(variable):
    with pytest.raises(SettingsError) as caught:
        load_settings({**BASE, variable: f"braze:{SECRET}", "COHORT_WEBHOOK_SECRETS": SECRET})
    assert str(caught.value).startswith("COHORT_WEBHOOK_SECRETS: ")
    assert SECRET not in str(caught.value)


def test_eu_mode_needs_no_amplitude_key_and_us_mode_does():
    assert not load_settings({"PROXY_API_KEYS": BASE["PROXY_API_KEYS"], "AMPLITUDE_REGION": "eu"}).profile_api
    with pytest.raises(SettingsError, match="^AMPLITUDE_SECRET_KEY: "):
        load_settings({"PROXY_API_KEYS": BASE["PROXY_API_KEYS"]})
