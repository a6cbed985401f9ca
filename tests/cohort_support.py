"""What the cohort tests share: a rig of store, receiver, applier and membership, and an HTTP receiver.

Several :class:`CohortRig` objects on one Redis or one SQLite file stand for several
processes (workers, instances) sharing the tier. :func:`serve_receiver` puts a receiver
behind a real HTTP server with the route's contract (``POST``, raw body, ``Authorization``,
the service's JSON errors), for the simulator's pushes to post to.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

from app.clock import Clock
from app.cohorts.applier import CohortApplier
from app.cohorts.membership import CohortMembership
from app.cohorts.receiver import CohortReceiver, WebhookSecrets
from app.cohorts.settings import CohortSettings
from app.cohorts.store import CohortStore, LocalCohortStore
from app.errors import ApiError, json_response, render_error
from app.stores.redis import RedisTier
from simulator.pushes import PushedBatch

SECRET = "cohort-webhook-secret-0001"
OLD_SECRET = "cohort-webhook-secret-0000"
BEARER = f"Bearer {SECRET}"
SETTLE = 300.0


@dataclass
class CohortRig:
    """One process's view: its store object, receiver, applier and membership."""

    store: CohortStore
    clock: Clock
    settings: CohortSettings = field(default_factory=lambda: CohortSettings(webhook_secrets=(SECRET, OLD_SECRET)))

    def __post_init__(self) -> None:
        self.receiver = CohortReceiver(WebhookSecrets(self.settings.webhook_secrets), self.store, self.clock)
        self.applier = CohortApplier(self.store)
        self.membership = CohortMembership(self.store, self.settings, self.clock)

    def receive(self, batches: Iterable[PushedBatch]) -> None:
        for batch in batches:
            self.receiver.receive(batch.body, BEARER)

    def apply_all(self) -> int:
        """Apply until the queue is empty (bounded: a queue that never empties fails the test)."""
        total = 0
        for _ in range(1000):
            done = self.applier.apply_pending()
            total += done
            if not done:
                return total
        raise AssertionError("the cohort queue did not empty")

    def answers(self, cohort_id: str, users: Iterable[str]) -> dict[str, bool | None]:
        """Each user's answer: a member or not, None where the store is not authoritative."""
        found = {user: self.membership.member(cohort_id, user) for user in users}
        return {user: None if answer is None else answer.member for user, answer in found.items()}

    def close(self) -> None:
        self.store.close()


def local_rigs(clock: Clock) -> list[CohortRig]:
    return [CohortRig(LocalCohortStore(clock), clock)]


@pytest.fixture
def make_rigs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., list[CohortRig]]]:
    """``make_rigs(kind, clock, n)``: *n* processes' rigs on one new Redis (``redis_url``) or SQLite file."""
    made: list[CohortRig] = []
    tiers: list[RedisTier] = []

    def build(kind: str, clock: Clock, count: int = 1, url: str | None = None) -> list[CohortRig]:
        from app.cohorts.redis_store import RedisCohortStore
        from app.cohorts.sqlite_store import SqliteCohortStore

        rigs = []
        for _ in range(count):
            if kind == "redis":
                tier = RedisTier(url or request.getfixturevalue("redis_url"), 2.0, clock=clock)
                tiers.append(tier)
                store: CohortStore = RedisCohortStore(tier, clock)
            else:
                store = SqliteCohortStore(str(tmp_path / "shared.sqlite3"), clock, timeout=2.0)
            rigs.append(CohortRig(store, clock))
        made.extend(rigs)
        return rigs

    yield build
    for rig in made:
        rig.close()
    for tier in tiers:
        tier.close()


def receiver_app(receiver: CohortReceiver) -> Callable[..., Iterable[bytes]]:
    """The receiver route's contract as a bare WSGI app: POST the raw body, 200 with the receipt, or the JSON error."""

    @Request.application  # type: ignore[arg-type]
    def application(request: Request) -> Response:
        if request.method != "POST":
            return json_response({"error": "method_not_allowed", "message": "POST a batch"}, 405)
        try:
            receipt = receiver.receive(request.get_data(cache=False), request.headers.get("Authorization"))
        except ApiError as exc:
            return render_error(exc)
        return json_response({"queued": receipt.queued, "message_id": receipt.message_id})

    return application  # type: ignore[return-value]


@dataclass
class ServedReceiver:
    url: str
    server: BaseWSGIServer


@pytest.fixture
def serve_receiver() -> Iterator[Callable[[CohortReceiver], ServedReceiver]]:
    """Serve a receiver over real HTTP on loopback: ``serve_receiver(rig.receiver).url``."""
    servers: list[BaseWSGIServer] = []

    def serve(receiver: CohortReceiver) -> ServedReceiver:
        server = make_server("127.0.0.1", 0, receiver_app(receiver), threaded=True)
        server.daemon_threads = True  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return ServedReceiver(f"http://127.0.0.1:{server.server_port}/v1/webhooks/amplitude/cohorts", server)

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()
