"""The receiving end of Amplitude's Cohort Webhooks, without HTTP: authenticate, validate, queue.

The route (``POST /v1/webhooks/amplitude/cohorts``) hands :meth:`CohortReceiver.receive`
the raw body and the ``Authorization`` header and answers ``200`` with the receipt, or the
typed error it raises. Nothing is applied here: the batch is validated, then queued in the
shared tier in one operation (a repeated ``message_id`` is dropped there), which takes
milliseconds for a 1,000-user batch, so Amplitude's 1-2 s timeout is never the receiver's
doing. The applier (:mod:`app.cohorts.applier`) applies it moments later.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from app.clock import SYSTEM_CLOCK, Clock
from app.cohorts.errors import CohortQueueUnavailable, InvalidBatch, WebhookBodyTooLarge, WebhookUnauthorized
from app.cohorts.payload import MAX_BODY_BYTES, parse_batch
from app.cohorts.store import CohortStore
from app.errors import ApiError
from app.stores.shared import SharedUnavailable

#: How far ahead of this service's clock a ``computed_time`` may be. A batch from the
#: future would hold its pairs against every real batch until that time came.
FUTURE_ALLOWANCE_SECONDS = 3600


class WebhookSecrets:
    """The accepted webhook secrets, held as digests so comparison time does not depend on content.

    A separate list from the caller keys (``COHORT_WEBHOOK_SECRETS``): a Braze caller key
    never writes a batch.
    """

    def __init__(self, secrets: tuple[str, ...]) -> None:
        self._digests = [hashlib.sha256(secret.encode()).digest() for secret in secrets]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def identify(self, presented: str) -> int | None:
        """The position (from 1) of the secret *presented* matches, or None."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        match = None
        # Compare against every secret, without stopping early, so timing reveals nothing.
        for position, expected in enumerate(self._digests, 1):
            if hmac.compare_digest(digest, expected):
                match = position
        return match


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None for any other form."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None


@dataclass(frozen=True, slots=True)
class Receipt:
    """What became of an accepted batch: queued, or dropped as a repeat of a queued one."""

    queued: bool
    cohort_id: str
    message_id: str
    users: int
    #: Which of COHORT_WEBHOOK_SECRETS it came with (from 1): shows when an old one falls out of use.
    secret: int


class CohortReceiver:
    """Authenticate, validate and queue one webhook batch; count what became of each."""

    def __init__(
        self,
        secrets: WebhookSecrets,
        store: CohortStore,
        clock: Clock = SYSTEM_CLOCK,
        on_queued: Callable[[], None] | None = None,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        """*on_queued* runs after a new batch is queued (to wake the applier); *on_outcome* with
        each outcome counted in :attr:`counts` (to count it in the metrics too)."""
        self.secrets = secrets
        self.store = store
        self._clock = clock
        self._on_queued = on_queued
        self._on_outcome = on_outcome
        #: This process's batches by outcome: ``received``, ``queued``, ``duplicate``, and
        #: ``refused:<error>`` (``refused:unauthorized``, ``refused:invalid_request``...).
        self.counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()

    def receive(self, body: bytes, authorization: str | None, declared_length: int | None = None) -> Receipt:
        """Queue the batch in *body* if *authorization* carries a webhook secret and the body is valid.

        *declared_length* is the request's ``Content-Length``: one past :data:`MAX_BODY_BYTES` is refused
        without the body being read (the route passes an empty *body* then), and counted as refused like
        any other refusal.

        :raises WebhookUnauthorized: no secret, or a wrong one (nothing was read).
        :raises WebhookBodyTooLarge: *body*, or its *declared_length*, is over :data:`MAX_BODY_BYTES`.
        :raises InvalidBatch: the body is not a valid batch (nothing was queued).
        :raises CohortQueueUnavailable: the shared tier failed; Amplitude will retry.
        """
        self._count("received")
        try:
            receipt = self._receive(body, authorization, declared_length or 0)
        except ApiError as exc:
            self._count(f"refused:{exc.error}")
            raise
        self._count("queued" if receipt.queued else "duplicate")
        return receipt

    def _receive(self, body: bytes, authorization: str | None, declared_length: int) -> Receipt:
        token = bearer_token(authorization)
        secret = self.secrets.identify(token) if token is not None else None
        if secret is None:
            raise WebhookUnauthorized()
        if max(len(body), declared_length) > MAX_BODY_BYTES:
            raise WebhookBodyTooLarge(f"the batch is larger than {MAX_BODY_BYTES} bytes")
        batch = parse_batch(body)
        if batch.computed_time > self._clock.time() + FUTURE_ALLOWANCE_SECONDS:
            raise InvalidBatch("computed_time", "is more than an hour ahead of this service's clock")
        try:
            queued = self.store.enqueue(batch)
        except SharedUnavailable as exc:
            raise CohortQueueUnavailable(retry_after=5.0) from exc
        if queued and self._on_queued is not None:
            self._on_queued()
        return Receipt(queued, batch.cohort_id, batch.message_id, len(batch.user_ids), secret)

    def _count(self, outcome: str) -> None:
        with self._counts_lock:
            self.counts[outcome] += 1
        if self._on_outcome is not None:
            self._on_outcome(outcome)
