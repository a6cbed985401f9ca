"""The ceiling for this stack: a bare Flask app answering constant JSON of the service's size.

Served by the service's own ``gunicorn.conf.py`` (``gunicorn -c gunicorn.conf.py
bench.bare_app:app``) in the service's environment, behind its own front, so worker
class, workers, threads, keep-alive and limits are the same and only the WSGI app
differs. It answers the service's routes with no authentication, no validation, no
cache and no logging: one constant body per route kind, byte for byte the size of what
the service answered for that route (the harness samples the service's answers and
passes them in ``BENCH_BARE_BODIES``, a JSON file mapping a route kind to a body).
Without that file every route answers a constant ~600-byte object.
"""

from __future__ import annotations

import json
import os

from flask import Flask, Response

ROUTE_KINDS = ("profile", "recommendations", "properties", "cohorts", "predictions")


def _bodies() -> dict[str, bytes]:
    path = os.environ.get("BENCH_BARE_BODIES")
    if path:
        with open(path) as handle:
            loaded = json.load(handle)
        return {kind: loaded[kind].encode() for kind in loaded}
    filler = {"user_id": "user-0", "padding": "x" * 560}
    body = json.dumps(filler, separators=(",", ":")).encode()
    return dict.fromkeys(ROUTE_KINDS, body)


BODIES = _bodies()
_DEFAULT = next(iter(BODIES.values()))

app = Flask(__name__, static_folder=None)
app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False


def _constant(kind: str) -> Response:
    return Response(BODIES.get(kind, _DEFAULT), status=200, content_type="application/json")


@app.get("/healthz")
def healthz() -> Response:
    return Response(b'{"status":"ok"}', content_type="application/json")


@app.get("/v1/<kind>/<user>")
def profile(kind: str, user: str) -> Response:
    return _constant("profile")


@app.get("/v1/<kind>/<user>/<route>/<path:rest>")
@app.get("/v1/<kind>/<user>/<route>", defaults={"rest": ""})
def sub_resource(kind: str, user: str, route: str, rest: str) -> Response:
    return _constant(route)
