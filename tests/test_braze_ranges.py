"""ALLOWED_CIDRS accepts Braze's clusters by name (braze:US-01), resolved to the shipped list."""

from __future__ import annotations

import ipaddress
import json
import re
from datetime import date

import pytest

from app.braze_ranges import braze_ranges, resolve
from app.http.security import NetworkAllowlist, parse_networks
from app.settings import SettingsError, load_settings
from tests.conftest import BRAZE_KEY
from tests.front_support import OUTSIDER, ROOT, session_from

DATA = json.loads((ROOT / "app" / "braze_ranges.json").read_text())

#: The shipped list, as Braze's documentation gave it on the date in the data file.
EXPECTED = {
    ("US-01", "US-02", "US-03", "US-04", "US-05", "US-06", "US-07"): [
        "23.21.118.191", "34.206.23.173", "50.16.249.9", "52.4.160.214", "54.87.8.34", "54.156.35.251",
        "52.54.89.238", "18.205.178.15",
    ],
    ("US-08",): [
        "52.151.246.51", "52.170.163.182", "40.76.166.157", "40.76.166.170", "40.76.166.167", "40.76.166.161",
        "40.76.166.156", "40.76.166.166", "40.76.166.160", "40.88.51.74", "52.154.67.17", "40.76.166.80",
        "40.76.166.84", "40.76.166.85", "40.76.166.81", "40.76.166.71", "40.76.166.144", "40.76.166.145",
    ],
    ("US-10",): ["100.25.232.164", "35.168.86.179", "52.7.44.117", "3.92.153.18", "35.172.3.129", "50.19.162.19"],
    ("EU-01", "EU-02"): [
        "52.58.142.242", "52.29.193.121", "35.158.29.228", "18.157.135.97", "3.123.166.46", "3.64.27.36",
        "3.65.88.25", "3.68.144.188", "3.70.107.88",
    ],
    ("AU-01",): ["13.210.1.145", "13.211.70.159", "13.238.45.54", "52.65.73.167", "54.153.242.239", "54.206.45.213"],
    ("ID-01",): ["108.136.157.246", "108.137.30.207", "16.78.128.71", "16.78.14.134", "16.78.162.208", "43.218.73.35"],
    ("JP-01",): [
        "13.159.155.212", "54.199.221.241", "13.192.23.16", "54.250.120.139", "18.181.114.232", "3.114.38.100",
    ],
    ("KR-01",): ["43.200.215.4", "52.79.67.175", "52.79.113.60", "3.34.212.92", "54.116.134.231", "3.37.197.225"],
}  # fmt: skip
CASES = [(cluster, addresses) for clusters, addresses in EXPECTED.items() for cluster in clusters]


@pytest.mark.parametrize(("cluster", "addresses"), CASES)
def test_each_name_resolves_to_its_published_list(cluster, addresses):
    assert resolve(f"braze:{cluster}") == tuple(addresses)
    assert resolve(f"braze:{cluster.lower()}") == tuple(addresses)
    allowlist = NetworkAllowlist(parse_networks((f"braze:{cluster}",)))
    assert all(allowlist.allows(address) for address in addresses)
    assert not allowlist.allows("198.51.100.1")


def test_the_list_says_when_and_where_it_was_taken():
    assert date.fromisoformat(DATA["taken"]) <= date.today()
    assert "braze-inc/braze-docs" in DATA["source"] and "_includes/braze_ips.md" in DATA["source"]
    assert {name for clusters in EXPECTED for name in clusters} == set(braze_ranges().clusters)


def test_every_entry_is_a_public_address_and_loopback_is_left_out():
    for group in DATA["groups"]:
        assert all(re.fullmatch(r"[A-Z]{2}-\d{2}", cluster) for cluster in group["clusters"])
        for address in group["addresses"]:
            ip = ipaddress.ip_address(address)
            assert ip.is_global, address  # Braze also lists 127.0.0.1 for Braze-to-Braze webhooks: never here
    assert "127.0.0.1" in DATA["left_out"]


def test_names_mix_with_raw_networks_in_settings():
    settings = load_settings(
        {
            "AMPLITUDE_SECRET_KEY": "k",
            "ALLOW_OPEN_ACCESS": "true",
            "ALLOWED_CIDRS": "braze:US-01, 10.0.0.0/8,braze:EU-01",
        }
    )
    assert settings.allowed_cidrs == ("braze:US-01", "10.0.0.0/8", "braze:EU-01")
    allowlist = NetworkAllowlist(parse_networks(settings.allowed_cidrs))
    for address in ("23.21.118.191", "10.9.8.7", "3.70.107.88"):
        assert allowlist.allows(address)
    assert not allowlist.allows("13.210.1.145")  # AU-01 was not named


@pytest.mark.parametrize("entry", ["braze:US-09", "braze:", "braze:US-01/24", "brazer:US-01"])
def test_unknown_names_stop_the_start(entry):
    with pytest.raises(SettingsError, match="^ALLOWED_CIDRS: "):
        load_settings({"AMPLITUDE_SECRET_KEY": "k", "ALLOW_OPEN_ACCESS": "true", "ALLOWED_CIDRS": entry})


def test_outside_a_named_range_403_before_any_work_inside_served_spoofing_changes_nothing(make_service, sim):
    """The test client plays the load balancer (127.0.0.1) and appends the caller's address."""
    service = make_service(ALLOWED_CIDRS="braze:US-01", TRUSTED_PROXY_COUNT=1, FORWARDED_ALLOW_IPS="127.0.0.1")
    inside, outside = "54.87.8.34", "13.210.1.145"  # US-01; AU-01
    served = service.get("/v1/users/user-1/cohorts", headers={"X-Forwarded-For": inside})
    assert served.status_code == 200 and served.json()["user_id"] == "user-1"
    for headers in ({"X-Forwarded-For": outside}, {"X-Forwarded-For": f"{inside}, {outside}"}):
        refused = service.get("/v1/users/user-2/cohorts", headers=headers)
        assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
        # Before any other work: not even the key is judged.
        assert service.get("/v1/users/user-2/cohorts", key="wrong-key-000", headers=headers).status_code == 403
    outsider = session_from(OUTSIDER)
    try:
        spoofed = outsider.get(
            f"{service.url}/v1/users/user-3/cohorts",
            headers={"Authorization": f"Bearer {BRAZE_KEY}", "X-Forwarded-For": inside},
            timeout=5,
        )
    finally:
        outsider.close()
    assert spoofed.status_code == 403
    assert sim.calls == 1
    exposition, _ = service.extensions.metrics.render()
    assert b"proxy_auth_failures_total{" not in exposition
