"""WSGI middleware that runs before Flask sees a request."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from app.http.arrival import ARRIVAL_KEY, ArrivalStamp

WSGIApp = Any

# Characters a path may carry unencoded; everything else is percent-encoded.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
_UNPRINTABLE = re.compile("[^\x21-\x7e]")


class RawPathMiddleware:
    """Route on the raw request path, so an id holding an encoded ``/`` stays one segment.

    WSGI servers hand Flask a decoded ``PATH_INFO``, in which ``users/a%2Fb/cohorts``
    and ``users/a/b/cohorts`` look the same. Every path value is decoded later, once,
    by :func:`app.http.params.decode_segment`. The arrival time (:mod:`app.http.arrival`)
    is kept for the deadline.
    """

    def __init__(self, app: WSGIApp, arrival: ArrivalStamp) -> None:
        self.app = app
        self._arrival = arrival

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ[ARRIVAL_KEY] = self._arrival(environ)
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if raw:
            path = raw.split("?", 1)[0].split("#", 1)[0]
            if not path.startswith("/") and "://" in path:
                # Absolute form (``GET http://host/v1/...``, RFC 9112 3.2.2): only a target
                # that does not start with "/" can be one; "://" inside a path is data.
                path = "/" + path.split("://", 1)[1].partition("/")[2]
            script_name = environ.get("SCRIPT_NAME", "")
            if script_name and path.startswith(script_name):
                path = path[len(script_name) :]
        else:
            path = quote(environ.get("PATH_INFO", "").encode("latin-1", "replace"), safe=_PATH_SAFE)
        if _UNPRINTABLE.search(path):
            # Raw bytes outside printable ASCII: re-encode so routing sees one form.
            path = quote(path.encode("latin-1", "replace"), safe=_PATH_SAFE + "%")
        environ["PATH_INFO"] = path
        return self.app(environ, start_response)
