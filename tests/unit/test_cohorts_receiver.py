"""The receiver without HTTP: who may write, what is refused, and that a refusal changes nothing."""

from __future__ import annotations

import base64

import orjson
import pytest

from app.cohorts.errors import CohortQueueUnavailable, InvalidBatch, WebhookBodyTooLarge, WebhookUnauthorized
from app.cohorts.payload import MAX_BODY_BYTES, CohortBatch
from app.cohorts.receiver import FUTURE_ALLOWANCE_SECONDS, CohortReceiver, WebhookSecrets, bearer_token
from app.cohorts.store import LocalCohortStore
from app.errors import render_error
from app.stores.shared import SharedUnavailable
from testkit.clock import FakeClock

SECRET = "cohort-webhook-secret-0001"
NEXT_SECRET = "cohort-webhook-secret-0002"
BRAZE_KEY = "test-key-braze-0001"


def batch_body(message_id: str = "m1", computed_time: int = 1_800_000_000, users: int = 3) -> bytes:
    return orjson.dumps(
        {"cohort_name": "VIP", "cohort_id": "vip", "in_cohort": True, "computed_time": str(computed_time),
         "message_id": message_id, "users": [{"user_id": f"user-{n}"} for n in range(users)]}
    )  # fmt: skip


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> LocalCohortStore:
    return LocalCohortStore(clock)


@pytest.fixture
def receiver(store: LocalCohortStore, clock: FakeClock) -> CohortReceiver:
    return CohortReceiver(WebhookSecrets((SECRET, NEXT_SECRET)), store, clock)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {SECRET}x",
        f"Bearer {SECRET[:-1]}",
        f"Api-Key {SECRET}",
        f"Basic {base64.b64encode(f'amplitude:{SECRET}'.encode()).decode()}",  # the secret, but not as Bearer
        f"Bearer {BRAZE_KEY}",  # a Braze caller key is not a webhook secret
        f"{SECRET}",
    ],
)
def test_only_a_webhook_secret_as_bearer_may_write(receiver, store, authorization):
    with pytest.raises(WebhookUnauthorized) as caught:
        receiver.receive(batch_body(), authorization)
    response = render_error(caught.value)
    assert response.status_code == 401 and orjson.loads(response.get_data())["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert SECRET not in response.get_data(as_text=True)
    assert store.records()[1] == []  # nothing was queued or counted
    assert receiver.counts["refused:unauthorized"] == 1


@pytest.mark.parametrize(("authorization", "position"), [(f"Bearer {SECRET}", 1), (f"bearer  {NEXT_SECRET} ", 2)])
def test_either_secret_works_while_one_is_rotated(receiver, authorization, position):
    receipt = receiver.receive(batch_body(), authorization)
    assert (receipt.queued, receipt.secret, receipt.users, receipt.cohort_id) == (True, position, 3, "vip")


def test_no_secret_configured_refuses_everything(store, clock):
    receiver = CohortReceiver(WebhookSecrets(()), store, clock)
    with pytest.raises(WebhookUnauthorized):
        receiver.receive(batch_body(), f"Bearer {SECRET}")


def test_bearer_token():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("BEARER  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token(None) is None


def test_an_oversized_body_is_refused_before_it_is_read(receiver, store):
    with pytest.raises(WebhookBodyTooLarge) as caught:
        receiver.receive(b"{" + b" " * MAX_BODY_BYTES + b"}", f"Bearer {SECRET}")
    assert render_error(caught.value).status_code == 413
    assert store.records()[1] == []


def test_a_body_declared_too_large_is_refused_unread_and_counted(receiver, store):
    with pytest.raises(WebhookBodyTooLarge):
        receiver.receive(b"", f"Bearer {SECRET}", declared_length=MAX_BODY_BYTES + 1)
    assert receiver.counts["refused:request_too_large"] == 1
    assert store.records()[1] == []
    assert receiver.receive(batch_body(), f"Bearer {SECRET}", declared_length=len(batch_body())).queued


def test_an_unauthenticated_oversized_body_is_unauthorized(receiver):
    with pytest.raises(WebhookUnauthorized):
        receiver.receive(b"x" * (MAX_BODY_BYTES + 1), None)


def test_a_batch_from_the_future_is_refused(receiver, clock, store):
    too_late = int(clock.time()) + FUTURE_ALLOWANCE_SECONDS + 1
    with pytest.raises(InvalidBatch) as caught:
        receiver.receive(batch_body(computed_time=too_late), f"Bearer {SECRET}")
    assert caught.value.extra["field"] == "computed_time"
    assert store.records()[1] == []
    assert receiver.receive(batch_body(computed_time=too_late - 1), f"Bearer {SECRET}").queued


def test_a_malformed_batch_changes_nothing(receiver, store):
    receiver.receive(batch_body("m1"), f"Bearer {SECRET}")
    before = store.records()
    with pytest.raises(InvalidBatch):
        receiver.receive(batch_body("m2")[:-2], f"Bearer {SECRET}")
    assert store.records() == before
    assert store.lease() is not None and store.lease() is None  # only the first batch is queued


def test_a_repeated_message_id_is_dropped_and_counted(receiver, store):
    first = receiver.receive(batch_body("m1"), f"Bearer {SECRET}")
    again = receiver.receive(batch_body("m1"), f"Bearer {NEXT_SECRET}")
    assert (first.queued, again.queued) == (True, False)
    (record,) = store.records()[1]
    assert (record.received, record.duplicates, record.pending) == (1, 1, 1)
    assert receiver.counts == {"received": 2, "queued": 1, "duplicate": 1}


def test_the_applier_is_woken_for_a_new_batch_only(store, clock):
    wakes: list[int] = []
    receiver = CohortReceiver(WebhookSecrets((SECRET,)), store, clock, on_queued=lambda: wakes.append(1))
    receiver.receive(batch_body("m1"), f"Bearer {SECRET}")
    receiver.receive(batch_body("m1"), f"Bearer {SECRET}")
    assert wakes == [1]


class BrokenStore(LocalCohortStore):
    def enqueue(self, batch: CohortBatch) -> bool:
        raise SharedUnavailable("redis down")


def test_a_store_failure_asks_amplitude_to_retry(clock):
    receiver = CohortReceiver(WebhookSecrets((SECRET,)), BrokenStore(clock), clock)
    with pytest.raises(CohortQueueUnavailable) as caught:
        receiver.receive(batch_body(), f"Bearer {SECRET}")
    response = render_error(caught.value)
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert orjson.loads(response.get_data())["error"] == "cohort_queue_unavailable"
    assert receiver.counts["refused:cohort_queue_unavailable"] == 1


def test_every_outcome_reaches_the_metrics_hook(store, clock):
    outcomes: list[str] = []
    receiver = CohortReceiver(WebhookSecrets((SECRET,)), store, clock, on_outcome=outcomes.append)
    receiver.receive(batch_body("m1"), f"Bearer {SECRET}")
    receiver.receive(batch_body("m1"), f"Bearer {SECRET}")
    with pytest.raises(WebhookUnauthorized):
        receiver.receive(batch_body("m2"), None)
    assert outcomes == ["received", "queued", "received", "duplicate", "received", "refused:unauthorized"]
