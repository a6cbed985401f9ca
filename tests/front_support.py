"""Helpers for the front proxy's tests: nginx and `make run-prod` in temp dirs, raw sockets, other source addresses.

Every process started here runs in a session of its own and is stopped by its id; nginx
gets a config rendered by deploy/nginx/render.py into a temp dir (never the system's).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

ROOT = Path(__file__).resolve().parent.parent
RENDER = ROOT / "deploy" / "nginx" / "render.py"
#: A loopback address that is not a configured proxy: "another host" on this machine.
OUTSIDER = "127.0.0.2"
#: The status :func:`raw_request` reports for an HTTP/0.9 answer (a body, no status line).
HTTP09 = 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll *predicate* until true; fail naming *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class SourceAddressAdapter(HTTPAdapter):
    """Connect from a chosen local address (loopback has all of 127.0.0.0/8)."""

    def __init__(self, source: str, **kwargs: Any) -> None:
        self.source = source
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def session_from(source: str) -> requests.Session:
    """A session whose connections come from *source*."""
    session = requests.Session()
    adapter = SourceAddressAdapter(source)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> RawAnswer:
    """Send *data* as is and read one answer (the server closes, or Content-Length is met)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            received += chunk
            head, sep, body = received.partition(b"\r\n\r\n")
            if sep:
                length = _content_length(head)
                if length is not None and len(body) >= length:
                    break
    if received.lstrip().startswith(b"{"):
        # An HTTP/0.9 exchange ("GET /path" with no version): a body without a head.
        return RawAnswer(HTTP09, {}, received)
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        raise AssertionError(f"no HTTP answer: {received[:200]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawAnswer(int(lines[0].split()[1]), headers, body)


def read_until_closed(port: int, data: bytes, timeout: float) -> tuple[bytes, bool]:
    """Send *data*, then read until the server closes: (what it sent, whether it closed in time)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received, True
            except TimeoutError:
                break
            if not chunk:
                return received, True
            received += chunk
        return received, False


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def render_front(prefix: Path, listen_port: int, upstream: str, *extra: str) -> Path:
    """Render the shipped nginx.conf into *prefix*, as `make run-prod` does."""
    prefix.mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o755)  # nginx's workers run as another user when the tests run as root
    argv = [
        sys.executable, str(RENDER), "--prefix", str(prefix), "--listen", f"127.0.0.1:{listen_port}",
        "--upstream", upstream, "--access-log", str(prefix / "access.log"), "--error-log", str(prefix / "error.log"),
        "--worker-processes", "1", *extra,
    ]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, timeout=30)
    return prefix / "nginx.conf"


class NginxFront:
    """nginx from the rendered config in a temp dir: never the system's nginx or its files."""

    def __init__(self, upstream: str, *extra: str, tls_port: int | None = None) -> None:
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if binary is None:
            raise AssertionError("nginx is not installed: run `make system-deps` (make test does)")
        self.prefix = Path(tempfile.mkdtemp(prefix="front-test-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tls_port = tls_port
        conf = render_front(self.prefix, self.port, upstream, *extra)
        self.error_log = self.prefix / "error.log"
        self._output = open(self.prefix / "nginx.out", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [binary, "-p", str(self.prefix), "-c", str(conf), "-e", str(self.error_log)],
            stdin=subprocess.DEVNULL, stdout=self._output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(lambda: self.process.poll() is not None or port_open(self.port), 15, "nginx to listen")
            if tls_port is not None:
                wait_for(lambda: self.process.poll() is not None or port_open(tls_port), 15, "nginx TLS")
            if self.process.poll() is not None:
                raise AssertionError(f"nginx exited: {self.logs()}")
        except BaseException:
            self.stop()
            raise

    def logs(self) -> str:
        parts = []
        for name in ("nginx.out", "error.log"):
            path = self.prefix / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def access_lines(self) -> list[dict[str, Any]]:
        path = self.prefix / "access.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        self._output.close()
        shutil.rmtree(self.prefix, ignore_errors=True)


class ProdShape:
    """``scripts/run-prod.sh`` (what `make run-prod` runs) on free loopback ports."""

    def __init__(self, log_path: Path, env: Mapping[str, str] | None = None) -> None:
        from app.settings import SettingsSchema

        self.port = free_port()
        self.backend_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # Only what this test chose: no setting leaks in from the caller's environment.
        inherited = {k: v for k, v in os.environ.items() if k not in SettingsSchema().fields and k != "WEB_CONCURRENCY"}
        full_env = {
            **inherited,
            "FRONT_HOST": "127.0.0.1",
            "FRONT_PORT": str(self.port),
            "BACKEND_PORT": str(self.backend_port),
            "SIMULATOR_PORT": str(free_port()),
            "VENV": str(Path(sys.executable).parent.parent),
            **(env or {}),
        }
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "run-prod.sh")],
            cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(self._ready, 40, "run-prod to answer /readyz through the front", interval=0.2)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"run-prod exited: {self.logs()}")
        try:
            return requests.get(self.url + "/readyz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM the script (it stops nginx, gunicorn and the simulator), then sweep its session."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=5)
        self._log.close()


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise AssertionError("openssl is not installed: run `make system-deps`")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key
