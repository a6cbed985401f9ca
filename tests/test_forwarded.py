"""X-Forwarded-For counts only from the proxies named in FORWARDED_ALLOW_IPS, in the app and in gunicorn."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from typing import Any

import pytest

from app.http.forwarded import PEER_KEY, TrustedForwardedFor
from app.settings import SettingsError, load_settings
from tests.conftest import BRAZE_KEY
from tests.front_support import OUTSIDER, ROOT, session_from

PROXY = "127.0.0.1"
ALLOWED = "203.0.113.0/24"
INSIDE = "203.0.113.7"


def _seen(peer: str, hops: int, headers: dict[str, str], proxies: str = PROXY) -> dict[str, Any]:
    environ: dict[str, Any] = {"REMOTE_ADDR": peer, "wsgi.url_scheme": "http", **headers}
    seen: dict[str, Any] = {}

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(env)
        return []

    networks = tuple(ipaddress.ip_network(p) for p in proxies.split(","))
    TrustedForwardedFor(app, networks, hops)(environ, lambda *a: None)
    return seen


@pytest.mark.parametrize(
    ("peer", "hops", "forwarded_for", "expected"),
    [
        (PROXY, 1, INSIDE, INSIDE),  # the proxy appended the client
        (PROXY, 1, f"{INSIDE}, 198.51.100.1", "198.51.100.1"),  # the client's own entry sits further left
        (PROXY, 2, f"{INSIDE}, 198.51.100.1", INSIDE),  # two proxies appended
        (PROXY, 2, "198.51.100.1", PROXY),  # fewer entries than proxies: nothing is believed
        (PROXY, 1, "not-an-address", PROXY),
        (PROXY, 1, "", PROXY),
        (OUTSIDER, 1, INSIDE, OUTSIDER),  # not a named proxy: the header is ignored
        (OUTSIDER, 2, f"{INSIDE}, 127.0.0.1", OUTSIDER),
        ("198.51.100.9", 1, INSIDE, "198.51.100.9"),
        (f"::ffff:{PROXY}", 1, INSIDE, INSIDE),  # the proxy, seen over an IPv4-mapped socket
    ],
)
def test_client_address_table(peer, hops, forwarded_for, expected):
    seen = _seen(peer, hops, {"HTTP_X_FORWARDED_FOR": forwarded_for} if forwarded_for else {})
    assert seen["REMOTE_ADDR"] == expected
    assert seen[PEER_KEY] == peer


def test_scheme_only_from_a_named_proxy():
    assert _seen(PROXY, 1, {"HTTP_X_FORWARDED_PROTO": "https"})["wsgi.url_scheme"] == "https"
    assert _seen(OUTSIDER, 1, {"HTTP_X_FORWARDED_PROTO": "https"})["wsgi.url_scheme"] == "http"
    assert _seen(PROXY, 1, {"HTTP_X_FORWARDED_PROTO": "javascript"})["wsgi.url_scheme"] == "http"


def test_proxy_networks_are_accepted():
    assert _seen("10.1.2.3", 1, {"HTTP_X_FORWARDED_FOR": INSIDE}, proxies="10.0.0.0/8")["REMOTE_ADDR"] == INSIDE


@pytest.mark.parametrize("value", ["*", "127.0.0.1,*", "10.0.0.1/8", "proxy.internal"])
def test_forwarded_allow_ips_must_name_proxies(value):
    with pytest.raises(SettingsError, match="^FORWARDED_ALLOW_IPS: "):
        load_settings({"AMPLITUDE_SECRET_KEY": "k", "ALLOW_OPEN_ACCESS": "true", "FORWARDED_ALLOW_IPS": value})


def _gunicorn_conf_value(env: dict[str, str]) -> str:
    """What gunicorn.conf.py gives gunicorn, read in a child process (the file sets environment variables)."""
    code = "import runpy; print(runpy.run_path('gunicorn.conf.py')['forwarded_allow_ips'])"
    clean = {k: v for k, v in os.environ.items() if k != "FORWARDED_ALLOW_IPS"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_gunicorn_and_the_app_read_one_setting_with_one_default():
    default = load_settings({"AMPLITUDE_SECRET_KEY": "k", "ALLOW_OPEN_ACCESS": "true"}).forwarded_allow_ips
    assert _gunicorn_conf_value({}) == ",".join(default)
    assert _gunicorn_conf_value({"FORWARDED_ALLOW_IPS": "10.0.0.0/8,192.0.2.1"}) == "10.0.0.0/8,192.0.2.1"


def _allowlisted(make_service):
    return make_service(ALLOWED_CIDRS=ALLOWED, TRUSTED_PROXY_COUNT=1, FORWARDED_ALLOW_IPS=PROXY)


def test_spoofed_forwarded_for_from_a_non_proxy_peer_gets_403(make_service, sim):
    service = _allowlisted(make_service)
    auth = {"Authorization": f"Bearer {BRAZE_KEY}", "X-Forwarded-For": INSIDE}
    # From the named proxy, its entry is believed.
    assert service.get("/v1/users/user-1/cohorts", headers={"X-Forwarded-For": INSIDE}).status_code == 200
    outsider = session_from(OUTSIDER)
    try:
        for header in (INSIDE, f"{INSIDE}, {INSIDE}", f"198.51.100.1, {INSIDE}"):
            response = outsider.get(
                f"{service.url}/v1/users/user-2/cohorts", headers={**auth, "X-Forwarded-For": header}, timeout=5
            )
            assert response.status_code == 403, response.text
            assert response.json()["error"] == "forbidden"
    finally:
        outsider.close()
    assert sim.calls == 1  # the refused requests did no other work


def test_rotating_forwarded_for_does_not_escape_the_auth_brake(make_service, sim):
    service = make_service(TRUSTED_PROXY_COUNT=1, FORWARDED_ALLOW_IPS=PROXY, AUTH_FAILURE_LIMIT_PER_MINUTE=20)
    outsider = session_from(OUTSIDER)
    statuses = []
    try:
        for n in range(60):
            response = outsider.get(
                f"{service.url}/v1/users/user-1/cohorts",
                headers={"Authorization": f"Bearer guess-{n:08d}", "X-Forwarded-For": f"198.51.100.{n + 1}"},
                timeout=5,
            )
            statuses.append(response.status_code)
    finally:
        outsider.close()
    assert statuses[:20] == [401] * 20
    assert statuses[20:] == [429] * 40  # braked: every guess counted against the real peer
    assert sim.calls == 0


def test_real_gunicorn_ignores_forwarded_for_from_a_non_proxy_peer(gunicorn_service, sim):
    service = gunicorn_service(ALLOWED_CIDRS=ALLOWED, TRUSTED_PROXY_COUNT=1, FORWARDED_ALLOW_IPS=PROXY)
    headers = {"Authorization": f"Bearer {BRAZE_KEY}", "X-Forwarded-For": INSIDE}
    proxy, outsider = session_from(PROXY), session_from(OUTSIDER)
    try:
        assert proxy.get(f"{service.url}/v1/users/user-1/cohorts", headers=headers, timeout=5).status_code == 200
        spoofed = outsider.get(f"{service.url}/v1/users/user-2/cohorts", headers=headers, timeout=5)
        assert spoofed.status_code == 403
        assert spoofed.json()["error"] == "forbidden"
    finally:
        proxy.close()
        outsider.close()
