"""Render the front's nginx.conf from nginx.conf.template (standard library only).

Used by ``make run-prod`` (scripts/run-prod.sh), the front image (deploy/nginx/Dockerfile)
and the tests, so all three run the same configuration. Options default to ``FRONT_*``
environment variables::

    python3 deploy/nginx/render.py --prefix /tmp/front --upstream 127.0.0.1:8001
    nginx -p /tmp/front -c /tmp/front/nginx.conf -e /tmp/front/error.log
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "nginx.conf.template"

#: The errors the front answers itself: status → (error code, message). The codes match
#: the service's (app/errors.py) where the cause is the same.
FRONT_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request", "the request is not valid HTTP"),
    405: ("method_not_allowed", "the method is not allowed"),
    408: ("request_timeout", "the request was not received in time"),
    411: ("length_required", "the request needs a Content-Length"),
    413: ("request_too_large", "the request body is larger than the service accepts"),
    414: ("request_line_too_long", "the request line is longer than the service accepts (8 KiB)"),
    431: ("headers_too_large", "a request header is longer than the service accepts (8 KiB), or all of them are"),
    500: ("internal_error", "internal error"),
    501: ("not_implemented", "the request uses something the front does not implement"),
    502: ("bad_gateway", "the service behind the front did not answer"),
    503: ("service_unavailable", "the front cannot take the request now"),
    504: ("gateway_timeout", "the service behind the front did not answer in time"),
    505: ("http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served"),
}
#: nginx's own codes for "request header too large" (494) and the like, sent as a real status.
NGINX_ALIASES = {494: 431}
RETRYABLE = (502, 503, 504)
_PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def _address(value: str, option: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise SystemExit(f"render: {option} must be HOST:PORT, not {value!r}")
    return value


def error_pages() -> str:
    """``error_page`` lines: every error the front answers itself goes to a JSON location."""
    lines = [f"        error_page {status} /_front_error/{status};" for status in FRONT_ERRORS]
    for alias, status in NGINX_ALIASES.items():
        lines.append(f"        error_page {alias} ={status} /_front_error/{status};")
    return "\n".join(lines)


def error_locations() -> str:
    """One internal location per error, answering the JSON object with ``no-store``."""
    blocks = []
    for status, (error, message) in FRONT_ERRORS.items():
        body = json.dumps({"error": error, "message": message}, separators=(",", ":"))
        if any(c in body for c in "'$\\"):
            raise SystemExit(f"render: the message for {status} must not contain ' $ or \\")
        retry = "            add_header Retry-After 5 always;\n" if status in RETRYABLE else ""
        blocks.append(
            f"        location = /_front_error/{status} {{\n"
            "            internal;\n"
            "            access_log ${ACCESS_LOG} front;\n"
            "            default_type application/json;\n"
            "            add_header Cache-Control no-store always;\n"
            "            add_header X-Content-Type-Options nosniff always;\n"
            f"{retry}"
            f"            return {status} '{body}';\n"
            "        }"
        )
    return "\n".join(blocks)


def real_ip(networks: str) -> str:
    """Believe X-Forwarded-For from these load balancers in front of the front (none: the front is the edge)."""
    entries = [entry.strip() for entry in networks.split(",") if entry.strip()]
    lines = []
    for entry in entries:
        if entry == "*":
            raise SystemExit("render: --real-ip-from must name the load balancers, not '*'")
        try:
            ipaddress.ip_network(entry)
        except ValueError:
            raise SystemExit(f"render: --real-ip-from entry {entry!r} is not a network or address") from None
        lines.append(f"    set_real_ip_from {entry};")
    if lines:
        lines += ["    real_ip_header X-Forwarded-For;", "    real_ip_recursive on;"]
    return "\n".join(lines)


def tls(listen: str | None, cert: str | None, key: str | None) -> str:
    """The TLS listener when a certificate is given (plain HTTP keeps listening too)."""
    if not (listen or cert or key):
        return ""
    if not (cert and key):
        raise SystemExit("render: TLS needs both --tls-cert and --tls-key")
    for path in (cert, key):
        if not Path(path).is_file():
            raise SystemExit(f"render: {path} does not exist")
    listen = _address(listen or "0.0.0.0:8443", "--tls-listen")
    return "\n".join(
        [
            f"        listen {listen} ssl;",
            f"        ssl_certificate {Path(cert).resolve()};",
            f"        ssl_certificate_key {Path(key).resolve()};",
            "        ssl_protocols TLSv1.2 TLSv1.3;",
            "        ssl_session_cache shared:front_tls:10m;",
            "        ssl_session_timeout 1h;",
        ]
    )


def render(values: dict[str, str], template: str | None = None) -> str:
    """Fill every ``${NAME}`` of the template; a name without a value is an error."""
    text = TEMPLATE.read_text() if template is None else template
    # Blocks first: they carry ${ACCESS_LOG} of their own.
    for block in ("ERROR_PAGES", "ERROR_LOCATIONS", "REAL_IP", "TLS"):
        text = text.replace("${" + block + "}", values[block])

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise SystemExit(f"render: no value for ${{{name}}}")
        return values[name]

    return _PLACEHOLDER.sub(fill, text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", required=True, help="directory for nginx.conf, the pid file and temp files")
    parser.add_argument("--listen", default=_env("FRONT_LISTEN", "0.0.0.0:8000"), help="HOST:PORT for plain HTTP")
    parser.add_argument("--upstream", default=_env("FRONT_UPSTREAM", "127.0.0.1:8001"), help="gunicorn's HOST:PORT")
    parser.add_argument("--tls-listen", default=_env("FRONT_TLS_LISTEN"), help="HOST:PORT for TLS (default :8443)")
    parser.add_argument("--tls-cert", default=_env("FRONT_TLS_CERT"), help="PEM certificate chain")
    parser.add_argument("--tls-key", default=_env("FRONT_TLS_KEY"), help="PEM private key")
    parser.add_argument("--real-ip-from", default=_env("FRONT_REAL_IP_FROM", ""), help="load balancers before this")
    parser.add_argument("--header-timeout", type=float, default=float(_env("FRONT_HEADER_TIMEOUT", "10") or 10))
    parser.add_argument("--body-timeout", type=float, default=float(_env("FRONT_BODY_TIMEOUT", "10") or 10))
    parser.add_argument("--upstream-timeout", type=float, default=float(_env("FRONT_UPSTREAM_TIMEOUT", "10") or 10))
    parser.add_argument("--worker-processes", default=_env("FRONT_WORKER_PROCESSES", "auto"))
    parser.add_argument("--worker-connections", type=int, default=int(_env("FRONT_WORKER_CONNECTIONS", "16384") or 0))
    parser.add_argument("--access-log", default=_env("FRONT_ACCESS_LOG", "/dev/stdout"))
    parser.add_argument("--error-log", default=_env("FRONT_ERROR_LOG", "/dev/stderr"))
    return parser.parse_args(argv)


def _open_files_limit(wanted: int) -> int:
    """*wanted*, or this machine's hard limit if lower (nginx cannot raise past it)."""
    try:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    except (ImportError, OSError, ValueError):
        return wanted
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


def _seconds(value: float) -> str:
    return str(max(1, round(value)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    prefix = Path(args.prefix).resolve()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    values = {
        "PREFIX": str(prefix),
        "LISTEN": _address(args.listen, "--listen"),
        "UPSTREAM": _address(args.upstream, "--upstream"),
        "TLS": tls(args.tls_listen, args.tls_cert, args.tls_key),
        "REAL_IP": real_ip(args.real_ip_from),
        "HEADER_TIMEOUT_SECONDS": _seconds(args.header_timeout),
        "BODY_TIMEOUT_SECONDS": _seconds(args.body_timeout),
        "UPSTREAM_TIMEOUT_SECONDS": _seconds(args.upstream_timeout),
        "WORKER_PROCESSES": args.worker_processes,
        "WORKER_CONNECTIONS": str(args.worker_connections),
        "WORKER_RLIMIT_NOFILE": str(_open_files_limit(2 * args.worker_connections + 1024)),
        "ACCESS_LOG": args.access_log,
        "ERROR_LOG": args.error_log,
        "ERROR_PAGES": error_pages(),
        "ERROR_LOCATIONS": error_locations(),
    }
    (prefix / "nginx.conf").write_text(render(values))
    print(prefix / "nginx.conf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
