"""``GET /preview``: the renderer as a page, in-process lookups only, shown safely in a real headless Chromium.

Set ``PREVIEW_SCREENSHOT=docs/preview.png`` to refresh docs/templates.md's screenshot from the browser test.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import BRAZE_KEY, ROOT
from tests.doc_examples import examples

ADMIN_KEY = "test-admin-key-0003"
# The first example of docs/templates.md's "Writing templates": the whole profile, saved once.
EXAMPLE = examples("liquid", (ROOT / "docs" / "templates.md",), after="\n## Writing templates\n")[0].text
SCRIPT = "<script>document.title='pwned'</script>"


@pytest.fixture
def page(make_service: Any) -> Any:
    return make_service(PREVIEW_PAGE="true", ADMIN_API_KEYS=f"ops:{ADMIN_KEY}", ACCESS_LOG="false")


def post(service: Any, key: str | None = ADMIN_KEY, **form: str) -> requests.Response:
    headers = {"Authorization": "Basic " + base64.b64encode(f"me:{key}".encode()).decode()} if key else {}
    return requests.post(f"{service.url}/preview", data=form, headers=headers, timeout=10)


def test_the_page_is_off_unless_enabled(service):
    assert service.get("/preview", key=BRAZE_KEY).status_code == 404


def test_the_page_needs_the_admin_key_when_there_are_admin_keys(page, sim):
    assert page.get("/preview", key=None).status_code == 401
    refused = page.get("/preview", key=BRAZE_KEY)  # a caller key does not open it
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Basic")
    assert post(page, key=BRAZE_KEY, template=EXAMPLE, user="user-42").status_code == 401
    opened = page.get("/preview", key=ADMIN_KEY)
    assert opened.status_code == 200 and "<textarea" in opened.text
    assert "script-src" not in opened.headers["Content-Security-Policy"]  # default-src 'none': no script at all
    assert "default-src 'none'" in opened.headers["Content-Security-Policy"]
    assert sim.calls == 0


def test_a_caller_key_opens_it_when_there_are_no_admin_keys(make_service):
    page = make_service(PREVIEW_PAGE="true", ACCESS_LOG="false")
    assert page.get("/preview", key=BRAZE_KEY).status_code == 200
    rendered = post(page, key=BRAZE_KEY, template=EXAMPLE, user="user-42")
    assert rendered.status_code == 200 and "picked for you: sku-" in rendered.text


def test_a_render_is_answered_in_process_by_the_service_itself(page, sim):
    response = post(page, template=EXAMPLE, user="user-42")
    assert response.status_code == 200
    assert "Hi Linus,\npicked for you: sku-" in response.text
    assert re.search(r"<td>https://proxy.example.com/v1/users/user-42</td>\s*<td class=\"ok\">200</td>", response.text)
    assert sim.calls == 1
    again = post(page, template=EXAMPLE, user="user-42")
    assert "<td>HIT</td>" in again.text and sim.calls == 1  # the page reads the same cache as Braze
    assert ADMIN_KEY not in response.text + again.text and BRAZE_KEY not in response.text


@pytest.fixture
def bystander() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server that records every request it gets (none, if the page behaves)."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"secret": "internal"}')

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", hits
    server.shutdown()
    server.server_close()


def test_the_page_never_makes_an_outbound_request(page, bystander):
    url, hits = bystander
    template = "{% connected_content " + url + "/internal :save leak %}[{{ leak.secret }}]"
    response = post(page, template=template, user="user-1")
    assert response.status_code == 200 and '<pre id="rendered">[]</pre>' in response.text
    assert "external-call-skipped" in response.text
    assert hits == []


def test_cross_site_posts_and_bad_attributes_are_refused(page, sim):
    headers = {"Authorization": "Basic " + base64.b64encode(f"me:{ADMIN_KEY}".encode()).decode()}
    forged = requests.post(
        f"{page.url}/preview",
        data={"template": EXAMPLE, "user": "user-1"},
        headers={**headers, "Sec-Fetch-Site": "cross-site"},
        timeout=10,
    )
    assert forged.status_code == 403
    from_elsewhere = requests.post(
        f"{page.url}/preview",
        data={"template": EXAMPLE, "user": "user-1"},
        headers={**headers, "Origin": "https://attacker.example"},
        timeout=10,
    )
    assert from_elsewhere.status_code == 403
    bad = post(page, template=EXAMPLE, user="user-1", attributes="{not json")
    assert bad.status_code == 400 and "attributes are not JSON" in bad.text
    assert sim.calls == 0


# --- In a real browser -------------------------------------------------------------------------------------------


@pytest.fixture
def chromium() -> Iterator[Any]:
    """Debian's chromium and chromedriver, headless (``make test`` installs both)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.fail("chromium and chromedriver are not installed: run `make system-deps`")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_renders_a_readme_example_and_shows_markup_as_text(page, sim, chromium, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    credentials = base64.b64encode(f"me:{ADMIN_KEY}".encode()).decode()
    chromium.execute_cdp_cmd("Network.enable", {})
    chromium.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {credentials}"}})
    chromium.get(f"{page.url}/preview")
    template = EXAMPLE + f'\n<p title="{SCRIPT}">{{{{${{first_name}}}}}}</p>'
    for name, value in {"template": template, "user": "user-42", "attributes": f'{{"first_name": "{SCRIPT}"}}'}.items():
        chromium.execute_script("arguments[0].value = arguments[1]", chromium.find_element(By.NAME, name), value)
    chromium.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(chromium, 20).until(expected_conditions.presence_of_element_located((By.ID, "calls")))

    rendered = chromium.find_element(By.ID, "rendered").text
    assert "picked for you: sku-" in rendered and "Hi Linus," in rendered
    assert f'<p title="{SCRIPT}">{SCRIPT}</p>' in rendered  # the markup is shown as text
    assert chromium.title == "Template preview"  # and no script ran, on the page or in the HTML view
    assert chromium.find_elements(By.TAG_NAME, "script") == []
    assert "None." in chromium.find_element(By.ID, "warnings").text
    calls = chromium.find_element(By.ID, "calls").text
    assert "https://proxy.example.com/v1/users/user-42 200 MISS" in calls
    assert sim.calls == 1
    target = os.environ.get("PREVIEW_SCREENSHOT")
    chromium.save_screenshot(str(ROOT / target) if target else str(tmp_path / "preview.png"))
    assert Path(ROOT / target if target else tmp_path / "preview.png").stat().st_size > 10_000
