"""Settings validation at start, the real gunicorn configuration, and what settings reveal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from app.settings import SettingsError, load_settings
from tests.conftest import BRAZE_KEY, ROOT, SIM_SECRET

GOOD = {"AMPLITUDE_SECRET_KEY": "amp-secret-123", "PROXY_API_KEYS": "braze:caller-key-1"}


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"AMPLITUDE_SECRET_KEY": ""}, "AMPLITUDE_SECRET_KEY"),
        ({"AMPLITUDE_SECRET_KEY": "   "}, "AMPLITUDE_SECRET_KEY"),
        ({"PROXY_API_KEYS": ""}, "PROXY_API_KEYS"),
        ({"PROXY_API_KEYS": "braze:short"}, "PROXY_API_KEYS"),
        ({"CACHE_TTL_SECONDS": "soon"}, "CACHE_TTL_SECONDS"),
        ({"CACHE_MAX_ENTRIES": "0"}, "CACHE_MAX_ENTRIES"),
        ({"PROFILE_PROPENSITY_TYPE": "percent"}, "PROFILE_PROPENSITY_TYPE"),
        ({"AMPLITUDE_API_URL": "http://profile-api.amplitude.com"}, "AMPLITUDE_API_URL"),
        ({"AMPLITUDE_API_URL": "not a url"}, "AMPLITUDE_API_URL"),
        ({"UPSTREAM_RATE_LIMIT_PER_MINUTE": "-5"}, "UPSTREAM_RATE_LIMIT_PER_MINUTE"),
        ({"REQUEST_DEADLINE_SECONDS": "5"}, "REQUEST_DEADLINE_SECONDS"),
        ({"REDIS_URL": "http://redis"}, "REDIS_URL"),
        ({"PORT": "70000"}, "PORT"),
        ({"BULK_CALLERS": "warm"}, "BULK_CALLERS"),  # names no caller key
        ({"RECOMMENDATIONS_FETCH": "never"}, "RECOMMENDATIONS_FETCH"),
        ({"SHARED_STATE_PATH": "state/shared.sqlite3"}, "SHARED_STATE_PATH"),  # relative
        ({"SHARED_STATE_PATH": "/nonexistent-dir/shared.sqlite3"}, "SHARED_STATE_PATH"),
        ({"SHARED_STATE_PATH": "/tmp"}, "SHARED_STATE_PATH"),  # a directory
        ({"REDIS_URL": "redis://r:6379", "REDIS_SENTINELS": "s:1", "REDIS_SENTINEL_SERVICE": "m"}, "REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "s1:26379,s2"}, "REDIS_SENTINELS"),  # no port
        ({"REDIS_SENTINELS": "s1:26379"}, "REDIS_SENTINEL_SERVICE"),  # no service
        ({"REDIS_SENTINEL_SERVICE": "mymaster"}, "REDIS_SENTINEL_SERVICE"),  # no sentinels
    ],
)
def test_bad_settings_name_the_variable_and_not_the_value(overrides, variable):
    with pytest.raises(SettingsError) as caught:
        load_settings({**GOOD, **overrides})
    message = str(caught.value)
    assert message.startswith(variable)
    assert "\n" not in message
    assert "amp-secret-123" not in message and "caller-key-1" not in message


def test_open_access_must_be_explicit():
    settings = load_settings({"AMPLITUDE_SECRET_KEY": "k", "ALLOW_OPEN_ACCESS": "true"})
    assert settings.allow_open_access and not settings.caller_keys


def test_settings_repr_redacts_secrets():
    settings = load_settings({**GOOD, "REDIS_URL": "redis://:hunter2secret@redis:6379/0"})
    text = repr(settings) + str(settings)
    assert "amp-secret-123" not in text and "caller-key-1" not in text and "hunter2secret" not in text
    assert "<redacted>" in text


def test_named_and_unnamed_caller_keys():
    settings = load_settings({"AMPLITUDE_SECRET_KEY": "k", "PROXY_API_KEYS": "braze:key-one-111, key-two-222"})
    assert [k.name for k in settings.caller_keys] == ["braze", "key2"]
    assert [k.key for k in settings.caller_keys] == ["key-one-111", "key-two-222"]


def test_gunicorn_refuses_bad_settings_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMPLITUDE_", "PROXY_"))}
    env.update({"AMPLITUDE_SECRET_KEY": "amp-secret-123", "PORT": "0", "CACHE_TTL_SECONDS": "never"})
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "configuration error" in line]
    assert len(lines) == 1 and "CACHE_TTL_SECONDS" in lines[0]
    assert "Traceback" not in result.stderr
    assert "amp-secret-123" not in result.stderr


def test_served_by_gunicorn_without_version_banner(gunicorn_service, sim):
    service = gunicorn_service()
    response = requests.get(
        service.url + "/v1/users/user-42/cohorts", headers={"Authorization": f"Bearer {BRAZE_KEY}"}, timeout=5
    )
    assert response.status_code == 200
    assert response.json()["user_id"] == "user-42"
    assert response.headers.get("Server") == "gunicorn"  # the name only: no version to fingerprint
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    encoded = requests.get(
        service.url + "/v1/users/a%2Fb%26c/cohorts", headers={"Authorization": f"Bearer {BRAZE_KEY}"}, timeout=5
    )
    assert encoded.status_code == 200 and encoded.json()["user_id"] == "a/b&c"
    assert SIM_SECRET not in service.logs()


def test_env_example_lists_every_setting():
    from app.settings import SettingsSchema

    text = (ROOT / ".env.example").read_text()
    missing = [name for name in SettingsSchema().fields if f"{name}=" not in text]
    assert missing == []
