"""The documentation stays true: generated pages current, every setting described, every curl
example answering as written, every link landing."""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
from marshmallow import fields as mf

from app.settings import SettingsSchema
from tests.doc_examples import DEMO_URL, PAGES, ROOT, CurlCall, curl_calls, github_anchors


def load_generator() -> ModuleType:
    """``scripts/gen_docs.py``, the generator behind ``make docs``."""
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


gen_docs = load_generator()


# --- Generated pages ---------------------------------------------------------------------------------------------


def test_every_setting_has_a_description():
    undescribed = [
        f"{name} ({gen_docs.declared_in(name)})"
        for name, field in SettingsSchema().fields.items()
        if not (field.metadata or {}).get("description")
    ]
    assert undescribed == [], (
        f"settings without a description: {', '.join(undescribed)}: add "
        'metadata={"description": ...} to each field, then run `make docs`'
    )


def test_the_generated_files_are_current():
    try:
        generated = gen_docs.outputs()
    except gen_docs.DocsError as exc:
        pytest.fail(f"scripts/gen_docs.py: {exc}")
    for path, text in generated.items():
        committed = path.read_text(encoding="utf-8") if path.exists() else ""
        if committed != text:
            diff = difflib.unified_diff(
                committed.splitlines(), text.splitlines(), "committed", "generated", lineterm="", n=1
            )
            shown = "\n".join(list(diff)[:40])
            pytest.fail(f"{path.relative_to(ROOT)} is stale: run `make docs`\n{shown}")


def test_a_setting_without_a_description_is_named(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(SettingsSchema._declared_fields, "NEW_UNDESCRIBED_SETTING", mf.String(load_default=None))
    with pytest.raises(gen_docs.DocsError, match="NEW_UNDESCRIBED_SETTING"):
        gen_docs.outputs()


def test_a_variable_gunicorn_reads_without_a_description_is_named(tmp_path: Path):
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(
        (ROOT / "gunicorn.conf.py").read_text(encoding="utf-8")
        + '\nmax_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS") or 0)\n',
        encoding="utf-8",
    )
    with pytest.raises(gen_docs.DocsError, match="GUNICORN_MAX_REQUESTS"):
        gen_docs.extra_variables(
            gen_docs.GUNICORN_VARIABLES, gen_docs.python_reads(conf), "gunicorn.conf.py", SettingsSchema().fields
        )


def test_defaults_come_from_the_code():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for name, field in SettingsSchema().fields.items():
        assert f"| `{name}` |" in text
        default = gen_docs.env_value(field.load_default)
        if default is not None and not field.required:
            assert f"| `{name}` | `{default}` |" in text, name
    conf = gen_docs.GUNICORN_CONF.read_text(encoding="utf-8")
    connections = re.search(r'os\.environ\.get\("GUNICORN_WORKER_CONNECTIONS"\) or (\d+)', conf)
    assert connections is not None and f"| `GUNICORN_WORKER_CONNECTIONS` | `{connections.group(1)}` |" in text


# --- Curl examples -----------------------------------------------------------------------------------------------

CALLS = curl_calls()
#: The examples the demo service below can answer; the others say why not (``# not run: WHY``).
RUNNABLE = [call for call in CALLS if call.not_run is None]


def test_the_docs_have_curl_examples():
    assert len(RUNNABLE) >= 15
    assert any(str(call).startswith("README.md") for call in RUNNABLE)


def test_examples_that_are_not_run_call_the_demo_too():
    """An example not run is still parsed (at collection) and still names `make run`'s URL."""
    for call in CALLS:
        if call.not_run is not None:
            assert call.url.startswith(DEMO_URL + "/"), f"{call}: examples call `make run` at {DEMO_URL}"
            assert len(call.not_run) >= 10, f"{call}: say why it is not run"


@pytest.fixture
def demo(make_service: Callable[..., Any]) -> Any:
    """The service as `make run` serves demo data (scripts/run.sh): the simulator, the caller key `demo-key`, the
    admin key `demo-admin-key`, its profile ids."""
    return make_service(
        PROXY_API_KEYS="braze:demo-key",
        ADMIN_API_KEYS="ops:demo-admin-key",
        PROFILE_REC_IDS="rec_home,rec_email",
        PROFILE_PREDICTION_IDS="pred_churn,pred_purchase",
        UPSTREAM_RATE_LIMIT_PER_MINUTE="600",
        ACCESS_LOG="false",  # and no DEMO_MODE: it only adds a start-up log line
    )


@pytest.mark.parametrize("call", RUNNABLE, ids=str)
def test_every_curl_example_answers_as_written(call: CurlCall, demo: Any):
    assert call.url.startswith(DEMO_URL + "/"), f"{call}: examples call `make run` at {DEMO_URL}"
    assert call.data is None or not call.data.startswith("@"), f"{call}: a file to send: mark it `# not run: WHY`"
    response = requests.request(
        call.method,
        demo.url + call.url[len(DEMO_URL) :],
        auth=call.auth,
        headers=call.headers,
        data=call.data,
        timeout=10,
        allow_redirects=False,
    )
    if call.expected is None:
        assert 200 <= response.status_code < 300, f"{call}: {response.status_code} {response.text[:300]}"
    else:
        assert response.status_code == call.expected, f"{call}: {response.status_code} {response.text[:300]}"
    if response.headers.get("Content-Type", "").startswith("application/json"):
        assert isinstance(response.json(), dict)


# --- Links -------------------------------------------------------------------------------------------------------

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _links() -> list[tuple[Path, str]]:
    found = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```$", "", page.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
        found += [(page, target) for target in _LINK.findall(text) if not re.match(r"[a-z]+:", target)]
    return found


@pytest.mark.parametrize(
    ("page", "target"),
    [pytest.param(page, target, id=f"{page.relative_to(ROOT)}->{target}") for page, target in _links()],
)
def test_every_relative_link_lands(page: Path, target: str):
    path, _, anchor = target.partition("#")
    destination = (page.parent / path).resolve() if path else page
    assert destination.exists(), f"{page.relative_to(ROOT)}: {target} names no file"
    if anchor:
        assert anchor in github_anchors(destination), f"{page.relative_to(ROOT)}: {target} names no heading"
