"""One app's cohort webhooks: the store, and its receiver, applier and membership, built once."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from app.clock import Clock, Deadline
from app.cohorts.applier import CohortApplier
from app.cohorts.membership import CohortAnswer, CohortMembership, StoreStatus
from app.cohorts.receiver import CohortReceiver, Receipt, WebhookSecrets
from app.cohorts.settings import CohortSettings
from app.cohorts.store import open_store
from app.core.query import Identity

if TYPE_CHECKING:
    from app.metrics import Metrics
    from app.settings import Settings
    from app.stores.redis import RedisTier

log = logging.getLogger(__name__)


class CohortWebhooks:
    """What the routes ask of the cohort webhooks, on the service's shared tier.

    Every worker runs an applier, so batches are applied moments after any worker queued
    them, whichever worker that was.
    """

    def __init__(self, settings: Settings, redis: RedisTier | None, metrics: Metrics, clock: Clock) -> None:
        self.settings = CohortSettings.from_settings(settings)
        self.store = open_store(redis, settings.shared_state_path, clock)
        self._metrics = metrics
        self.applier = CohortApplier(self.store, on_outcome=self._count)
        self.receiver = CohortReceiver(
            WebhookSecrets(self.settings.webhook_secrets),
            self.store,
            clock,
            on_queued=self.applier.wake,
            on_outcome=self._count,
        )
        self.membership = CohortMembership(self.store, self.settings, clock)
        self.applier.start()

    def member(self, identity: Identity, cohort_id: str, deadline: Deadline) -> CohortAnswer | None:
        """Whether the user is in *cohort_id*, from the webhooks; None when they cannot say for sure.

        Amplitude's webhooks name users by ``user_id`` only: a device id is never answered here.
        """
        if identity.id_field != "user_id":
            return None
        return self.membership.member(cohort_id, identity.value, deadline)

    def receive(self, body: bytes, authorization: str | None, declared_length: int | None = None) -> Receipt:
        """Authenticate, validate and queue one batch (see :class:`app.cohorts.receiver.CohortReceiver`)."""
        return self.receiver.receive(body, authorization, declared_length)

    def status(self) -> StoreStatus:
        return self.membership.status()

    def publish_gauges(self) -> None:
        """Members, last batch age, authoritative and silent, per cohort (for a scrape; never raises)."""
        try:
            status = self.status()
        except Exception as exc:  # noqa: BLE001 - a scrape must answer whatever the store does
            log.warning("cohort store status unavailable for the metrics (%s)", type(exc).__name__)
            return
        metrics = self._metrics
        for cohort in status.cohorts:
            metrics.cohort_members.labels(cohort.cohort_id).set(cohort.members)
            metrics.cohort_authoritative.labels(cohort.cohort_id).set(int(cohort.authoritative))
            metrics.cohort_silent.labels(cohort.cohort_id).set(int(cohort.silent))
            age = -1.0 if cohort.last_batch_age is None else cohort.last_batch_age
            metrics.cohort_last_batch_age.labels(cohort.cohort_id).set(age)

    def close(self) -> None:
        self.applier.close()
        self.store.close()

    def _count(self, outcome: str) -> None:
        # "refused:invalid_request" and the like are counted as "refused" (the log says why).
        self._metrics.cohort_batches.labels(outcome.partition(":")[0]).inc()
