"""``GET /preview``: the template renderer as a web page, answered in-process by the service's own routes.

Registered only when ``PREVIEW_PAGE=true``. It needs the admin key (a caller key when no admin
keys are set), never makes an outbound request (its Connected Content calls run through this
app's WSGI stack; every other URL is left uncalled), and shows everything the template, the
attributes or Amplitude supply as text: Jinja escapes it, and the CSP allows no script at all.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, current_app, render_template, request

from app.preview.calls import Credentials, Session
from app.preview.render import AttributesError, Previewer, Recipient
from app.preview.transport import WsgiTransport
from app.settings import CallerKey, Settings

log = logging.getLogger(__name__)
blueprint = Blueprint("preview_page", __name__, template_folder="templates")
MAX_FIELD_CHARS = 100_000
MAX_FORM_BYTES = 3 * MAX_FIELD_CHARS
EXAMPLE = """\
{% connected_content https://proxy.example.com/v1/users/{{${user_id} | url_param_escape}} :basic_auth amp_proxy \
:save profile :retry :cache_max_age 900 %}
{% if profile.__http_status_code__ != 200 %}{% abort_message('profile unavailable') %}{% endif %}
{% assign home = profile.recommendations.rec_home %}
Hi {{ profile.properties.first_name | default: ${first_name} | default: 'there' }},
{% if home.is_control %}our best sellers this week are waiting for you.{% else %}picked for you: \
{% for item in home.items limit:3 %}{{ item }}{% unless forloop.last %}, {% endunless %}{% endfor %}{% endif %}
"""
HEADERS = {
    # No script may run on this page, and nothing the rendered message names may load.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class PageKeys:
    """Who may open the page, and which caller key its lookups present."""

    openers: tuple[tuple[str, bytes], ...]  # (name, digest) of the keys that open the page
    callers: tuple[CallerKey, ...]
    lookup_default: str | None  # the caller key used when the opener's key is an admin key

    @classmethod
    def from_settings(cls, settings: Settings) -> PageKeys:
        openers = settings.admin_keys or settings.caller_keys
        named = [key for key in settings.caller_keys if key.name == "preview"] or list(settings.caller_keys)
        return cls(
            tuple((key.name, _digest(key.key)) for key in openers),
            settings.caller_keys,
            named[0].key if named else None,
        )

    def opener(self, presented: str | None) -> str | None:
        """The name of the key *presented* matches (every key compared, in constant time), or None."""
        if not self.openers:
            return "open"
        digest = _digest(presented or "")
        match = None
        for name, expected in self.openers:
            if hmac.compare_digest(digest, expected):
                match = name
        return match if presented else None

    def lookup_key(self, presented: str | None) -> str | None:
        """The caller key the page's own lookups present: the opener's when it is one, else the default."""
        for key in self.callers:
            if presented is not None and hmac.compare_digest(_digest(presented), _digest(key.key)):
                return key.key
        return self.lookup_default


def _presented_key() -> str | None:
    """The key from ``X-API-Key``, a Bearer token or Basic auth's password (the service's three styles)."""
    if request.headers.get("X-API-Key"):
        return request.headers["X-API-Key"].strip()
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip() or None
    if scheme.lower() == "basic":
        try:
            _, sep, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password if sep and password else None
    return None


def _page(status: int, **values: Any) -> Response:
    response = Response(render_template("preview.html", **values), status=status, mimetype="text/html")
    response.headers.update(HEADERS)
    return response


def _refused(status: int, message: str) -> Response:
    response = Response(message + "\n", status=status, mimetype="text/plain")
    response.headers.update(HEADERS)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="template preview", charset="UTF-8"'
    return response


def _cross_site() -> bool:
    """A form post from another site (a browser would send the signed-in credentials along)."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:  # every current browser sends it
        return fetch_site not in ("same-origin", "none")
    origin = request.headers.get("Origin")
    return origin is not None and urlsplit(origin).netloc != request.host


@blueprint.route("/preview", methods=["GET", "POST"])
def preview_page() -> Response:
    """Show the form; on POST, render the template for the recipient and show message, calls and warnings."""
    keys: PageKeys = current_app.extensions["preview_page"]
    presented = _presented_key()
    if keys.opener(presented) is None:
        # The presented value is never logged: it may be a real key sent to the wrong place.
        log.warning("preview page: authentication failed from %s", request.remote_addr)
        return _refused(401, "The preview page needs the admin key (or a caller key when no admin keys are set).")
    if request.method == "GET":
        return _page(200, template=EXAMPLE, user="user-42", attributes="")
    if _cross_site():
        return _refused(403, "Cross-site form posts are refused.")
    if (request.content_length or 0) > MAX_FORM_BYTES:
        return _refused(413, "The form is too large.")
    form = {name: request.form.get(name, "")[:MAX_FIELD_CHARS] for name in ("template", "user", "attributes")}
    try:
        document = json.loads(form["attributes"]) if form["attributes"].strip() else None
        recipient = Recipient.from_document(form["user"].strip() or None, document)
    except (ValueError, AttributesError) as exc:
        message = f"attributes: {exc}" if isinstance(exc, AttributesError) else f"attributes are not JSON: {exc}"
        return _page(400, error=message, **form)
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    session = Session(
        WsgiTransport(app, request.remote_addr or "127.0.0.1"), Credentials(caller_key=keys.lookup_key(presented))
    )
    result = Previewer(form["template"]).render(recipient, session)
    return _page(200, result=result, **form)


def register(app: Flask) -> None:
    """Serve the page on *app* (``create_app`` calls this only when ``PREVIEW_PAGE`` is on)."""
    app.extensions["preview_page"] = PageKeys.from_settings(app.extensions["profile_proxy"].settings)
    app.register_blueprint(blueprint)
