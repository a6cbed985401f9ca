"""``python -m app preview``: Braze templates rendered against the running service, linted, dry-run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from app.__main__ import main as app_main
from app.preview.cli import main
from tests.conftest import BRAZE_KEY
from tests.doc_examples import liquid_examples

PROFILE_URL = "https://proxy.example.com/v1/users/{{${user_id} | url_param_escape}}"
CALL = "{% connected_content " + PROFILE_URL + " :basic_auth amp_proxy :save p %}"
CHECK = "{% if p.__http_status_code__ != 200 %}{% abort_message('profile unavailable') %}{% endif %}"
RECS = (
    "{% if p.recommendations.rec_home.is_control %}Best sellers{% else %}"
    "{% for item in p.recommendations.rec_home.items limit:2 %}{{ item }} {% endfor %}{% endif %}"
)
GOOD = "\n".join([CALL, CHECK, "Hi {{ p.properties.first_name | default: 'there' }}!", RECS])


@pytest.fixture(autouse=True)
def _caller_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_API_KEY", BRAZE_KEY)
    monkeypatch.delenv("PROXY_URL", raising=False)


@pytest.fixture
def quiet_service(make_service: Any) -> Any:
    """The service as ``make run`` configures it, without access lines in the captured output."""
    return make_service(ACCESS_LOG="false")


def run(capsys: pytest.CaptureFixture[str], service: Any, tmp_path: Path, template: str, *args: str):
    """Run the command in-process against *service*; return (exit code, stdout, stderr)."""
    path = tmp_path / "message.liquid"
    path.write_text(template, encoding="utf-8")
    code = main([str(path), "--url", service.url, *args])
    out, err = capsys.readouterr()
    assert BRAZE_KEY not in out + err
    out = "".join(line for line in out.splitlines(keepends=True) if '"logger":' not in line)
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], service: Any, tmp_path: Path, template: str, *args: str):
    code, out, _ = run(capsys, service, tmp_path, template, *args, "--json")
    return code, json.loads(out)


def test_renders_the_message_with_the_calls_answered_by_the_service(quiet_service, sim, tmp_path, capsys):
    code, out, err = run(capsys, quiet_service, tmp_path, GOOD, "--user", "user-42")
    assert code == 0, err
    assert out.startswith("\n\nHi Linus!\nsku-")
    assert re.search(r"line 1: GET https://proxy.example.com/v1/users/user-42 -> 200 MISS .* -> p", err)
    assert "warning" not in err
    assert sim.calls == 1


def test_json_has_the_issue_shape(quiet_service, sim, tmp_path, capsys):
    code, result = run_json(capsys, quiet_service, tmp_path, GOOD, "--user", "control-1")
    assert code == 0
    assert set(result) == {"user_id", "rendered", "aborted", "calls", "warnings"}
    assert result["user_id"] == "control-1" and result["aborted"] is None and result["warnings"] == []
    assert result["rendered"].strip().endswith("Best sellers")
    (call,) = result["calls"]
    assert set(call) == {"url", "status", "cache", "ms", "saved_as"}
    assert call["url"] == "https://proxy.example.com/v1/users/control-1"
    assert (call["status"], call["cache"], call["saved_as"]) == (200, "MISS", "p")


def test_a_failed_call_leaves_the_variable_empty_and_abort_message_stops_the_message(quiet_service, tmp_path, capsys):
    code, result = run_json(capsys, quiet_service, tmp_path, GOOD, "--user", "unknown-1")
    assert code == 0
    assert result["rendered"] is None and result["aborted"] == "profile unavailable"
    assert result["calls"][0]["status"] == 404
    without_check = "\n".join([CALL + "[{{ p.user_id | default: 'empty' }}]"])
    _, result = run_json(capsys, quiet_service, tmp_path, without_check, "--user", "unknown-1")
    assert result["rendered"] == "[empty]"


def test_saved_object_carries_the_status_code_and_identical_urls_are_fetched_once(quiet_service, sim, tmp_path, capsys):
    template = f"{CALL}{{{{ p.__http_status_code__ }}}} {CALL}{{{{ p.user_id }}}}"
    code, result = run_json(capsys, quiet_service, tmp_path, template, "--user", "user-7")
    assert result["rendered"] == "200 user-7"
    assert [call["cache"] for call in result["calls"]] == ["MISS", "reused"]
    assert sim.calls == 1 and code == 0


def test_ids_are_escaped_into_the_path_and_attributes_come_from_the_file(quiet_service, tmp_path, capsys):
    attributes = tmp_path / "recipient.json"
    attributes.write_text(json.dumps({"first_name": "Ada", "custom_attributes": {"Loyalty Tier": "gold"}}))
    template = (
        CALL
        + CHECK
        + "{{ p.user_id }} {{${first_name}}} {{custom_attribute.${Loyalty Tier}}} {{ 'a&b' | json_escape }}"
    )
    code, result = run_json(
        capsys, quiet_service, tmp_path, template, "--user", "a b/c?", "--attributes", str(attributes)
    )
    assert result["calls"][0]["url"] == "https://proxy.example.com/v1/users/a%20b%2Fc%3F"
    assert result["rendered"] == "a b/c? Ada gold a&b"
    assert code == 0


def test_named_credentials_and_the_key_are_never_taken_from_the_command_line(quiet_service, tmp_path, capsys):
    _, result = run_json(capsys, quiet_service, tmp_path, GOOD, "--user", "user-1", "--credential", "amp_proxy=x:nope")
    assert result["calls"][0]["status"] == 401 and result["aborted"] == "profile unavailable"
    creds = tmp_path / "credentials"
    creds.write_text(f"# Braze credentials\namp_proxy=braze:{BRAZE_KEY}\n")
    _, result = run_json(capsys, quiet_service, tmp_path, GOOD, "--user", "user-1", "--credential", f"@{creds}")
    assert result["calls"][0]["status"] == 200
    code, _, err = run(capsys, quiet_service, tmp_path, GOOD, "--key", BRAZE_KEY)
    assert code == 2 and "--key is not accepted" in err
    code, _, err = run(capsys, quiet_service, tmp_path, GOOD, "--credential", "amp_proxy=hunter2hunter2")
    assert code == 2 and "NAME=USER:PASSWORD" in err and "hunter2" not in err


def test_other_hosts_are_called_only_when_allowed(quiet_service, tmp_path, capsys):
    # The service's own /healthz is not a per-user route, so it counts as "another host" here.
    template = "{% connected_content " + quiet_service.url + "/healthz %}[{{ connected.status }}]"
    code, result = run_json(capsys, quiet_service, tmp_path, template, "--user", "user-1")
    assert result["rendered"] == "[]" and result["calls"][0]["status"] is None
    assert [w["code"] for w in result["warnings"]] == ["external-call-skipped"] and code == 1
    code, result = run_json(capsys, quiet_service, tmp_path, template, "--user", "user-1", "--allow-external")
    assert result["rendered"] == "[ok]" and result["warnings"] == [] and code == 0


def test_stdin_template_through_python_m_app(quiet_service, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(GOOD.encode())))
    code = app_main(["preview", "-", "--user", "user-3", "--url", quiet_service.url])
    assert code == 0
    assert "Hi " in capsys.readouterr().out


def test_syntax_error_names_the_line(quiet_service, tmp_path, capsys):
    code, out, err = run(capsys, quiet_service, tmp_path, "ok\n{% if p == %}x{% endif %}", "--user", "u")
    assert code == 2 and "line 2: syntax-error" in err
    code, out, err = run(capsys, quiet_service, tmp_path, "ok\n\n{% if p %}never closed", "--user", "u")
    assert code == 2 and "line 3: syntax-error" in err


# --- Lints: one mistake each, exactly one warning -------------------------------------------------------------

NO_CHECK = "\n".join([CALL, "Hi {{ p.properties.first_name }}!"])
LINT_CASES = {
    "url-without-recipient": GOOD.replace(PROFILE_URL, "https://proxy.example.com/v1/users/user-42"),
    "id-not-escaped": GOOD.replace("{{${user_id} | url_param_escape}}", "{{${user_id}}}"),
    "secret-in-url": GOOD.replace("https://proxy", "https://amp:Zx81ksPq0a7LmQ2vTt9Wd@proxy"),
    "unhandled-failure": NO_CHECK,
    "control-group-ignored": "\n".join(
        [CALL, CHECK, "{% for item in p.recommendations.rec_home.items %}{{ item }}{% endfor %}"]
    ),
    "several-urls-one-user": GOOD
    + "\n{% connected_content "
    + PROFILE_URL
    + "/cohorts :basic_auth amp_proxy :save c %}{% if c.cohort_ids contains 'cohort_vip' %}VIP{% endif %}",
    "no-credential": GOOD.replace(" :basic_auth amp_proxy", ""),
    "key-in-template": GOOD.replace(":basic_auth amp_proxy", ':headers {"X-API-Key": "' + BRAZE_KEY + '"}'),
    "insecure-url": GOOD.replace("https://", "http://"),
    "unknown-option": GOOD.replace(":save p", ":save p :cache_for 900"),
    "cache-max-age-invalid": GOOD.replace(":save p", ":save p :cache_max_age 86400"),
    "undefined-variable": GOOD + "\nBye {{ frist_name }}",
    "unknown-filter": GOOD + "\n{{ p.properties.first_name | shout }}",
}


@pytest.mark.parametrize("code", list(LINT_CASES))
def test_each_lint_flags_its_mistake_and_nothing_else(code, quiet_service, tmp_path, capsys):
    exit_code, result = run_json(capsys, quiet_service, tmp_path, LINT_CASES[code], "--user", "user-42")
    assert [w["code"] for w in result["warnings"]] == [code], result["warnings"]
    assert exit_code == 1
    warning = result["warnings"][0]
    assert warning["line"] >= 1 and warning["message"]
    assert BRAZE_KEY not in json.dumps(result)


def test_the_good_template_and_its_text_output_have_no_warnings(quiet_service, tmp_path, capsys):
    code, _, err = run(capsys, quiet_service, tmp_path, GOOD, "--user", "user-42")
    assert code == 0 and "warning" not in err


def test_text_output_shows_the_warning_with_its_line(quiet_service, tmp_path, capsys):
    code, out, err = run(capsys, quiet_service, tmp_path, NO_CHECK, "--user", "user-42")
    assert code == 1 and "warning: line 2: unhandled-failure: `p.properties.first_name`" in err
    assert out == "\nHi Linus!\n"


# --- README.md and docs/*.md: every Liquid example renders cleanly against `make run`'s demo configuration -----

DOC_EXAMPLES = liquid_examples()


def test_the_docs_have_liquid_examples():
    assert len(DOC_EXAMPLES) >= 10
    assert any(example.page.name == "README.md" for example in DOC_EXAMPLES)


@pytest.mark.parametrize("user", ["user-42", "control-1"])
def test_every_doc_example_renders_without_warnings(user, quiet_service, tmp_path, capsys):
    # A Canvas message step reads the profile a Context step saved: give it one, as Braze would.
    profile = quiet_service.get(f"/v1/users/{user}").json()
    attributes = tmp_path / "attributes.json"
    attributes.write_text(json.dumps({"first_name": "Ada", "context": {"amp_profile": profile}}))
    for example in DOC_EXAMPLES:
        code, result = run_json(
            capsys,
            quiet_service,
            tmp_path,
            example.text,
            "--user",
            user,
            "--attributes",
            str(attributes),
            "--credential",
            f"amp_proxy=braze:{BRAZE_KEY}",
        )
        assert result["warnings"] == [], f"{example}:\n{example.text}"
        assert result["aborted"] is None and result["rendered"] is not None, f"{example}"
        assert all(call["status"] == 200 for call in result["calls"]), f"{example}"
        assert code == 0, f"{example}"


# --- Dry run -----------------------------------------------------------------------------------------------------

USERS = (
    [f"user-{n}" for n in range(1, 81)] + [f"control-{n}" for n in range(1, 11)] + [f"unknown-{n}" for n in range(10)]
)


def test_dry_run_summary_matches_what_the_service_counted(quiet_service, sim, tmp_path, capsys):
    users = tmp_path / "users.csv"
    users.write_text("external_id,email\n" + "".join(f"{u},{u}@example.com\n" for u in USERS), encoding="utf-8")
    code, out, err = run(
        capsys,
        quiet_service,
        tmp_path,
        GOOD,
        "--users",
        str(users),
        "--column",
        "external_id",
        "--json",
        "--no-progress",
    )
    lines = [json.loads(line) for line in out.splitlines()]
    per_recipient, summary = lines[:-1], lines[-1]["summary"]
    assert code == 0, err
    assert "spend the Amplitude budget like live traffic" in err
    assert sorted(line["user_id"] for line in per_recipient) == sorted(USERS)
    assert summary["recipients"] == summary["processed"] == 100
    assert summary["rendered"] == 90 and summary["aborted"] == 10
    assert summary["aborted_by_reason"] == {"profile unavailable": 10}
    assert summary["empty_by_reason"] == {"user_not_found": 10}
    in_control = [
        u for u in USERS[:90] if quiet_service.get(f"/v1/users/{u}").json()["recommendations"]["rec_home"]["is_control"]
    ]
    assert summary["empty_connected_content"] == 10 and summary["control_group"] == len(in_control) >= 10
    assert summary["braze_calls"] == 100 and summary["braze_calls_per_recipient"] == 1.0
    assert summary["upstream_calls"] == sim.calls == 100  # one whole-profile call per recipient, as /metrics says
    # A second run finds every profile cached: Braze still calls once per recipient, Amplitude not at all.
    code, out, _ = run(
        capsys, quiet_service, tmp_path, GOOD, "--users", str(users), "--column", "external_id", "--sample", "25"
    )
    assert code == 0
    assert re.match(r"dry run over 25 recipients in [\d.]+ s: rendered \d+, aborted \d+", out)
    assert out.rstrip().endswith("Braze calls per recipient 1.0 (25 in all), upstream calls caused 0")
    assert sim.calls == 100


def test_dry_run_of_a_template_that_calls_per_route_counts_braze_calls_not_upstream_calls(
    quiet_service, sim, tmp_path, capsys
):
    users = tmp_path / "users.txt"
    users.write_text("\n".join(f"user-{n}" for n in range(1, 21)), encoding="utf-8")
    template = LINT_CASES["several-urls-one-user"]
    code, out, err = run(capsys, quiet_service, tmp_path, template, "--users", str(users), "--no-progress")
    assert code == 1 and "several-urls-one-user" in err
    assert "Braze calls per recipient 2.0 (40 in all), upstream calls caused 20" in out
    assert sim.calls == 20  # the service answers both routes from one profile
