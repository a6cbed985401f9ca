"""What the cohort webhooks read of the service's settings, as one object.

The variables themselves (``COHORT_WEBHOOK_SECRETS``, ``COHORT_SETTLE_SECONDS``,
``COHORT_REALTIME_IDS``, ``COHORT_REALTIME_MAX_SILENCE_SECONDS``) are fields of
:class:`app.settings.SettingsSchema`, checked with every other setting at start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.settings import Settings


@dataclass(frozen=True)
class CohortSettings:
    """What the cohort webhooks read from the environment."""

    #: ``COHORT_WEBHOOK_SECRETS``: the Bearer secrets Amplitude may send; none: no receiver.
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    #: ``COHORT_SETTLE_SECONDS``: quiet after the full sync's last batch before the cohort is
    #: authoritative. Batches of one sync follow each other within seconds (each must be
    #: answered within 1-2 s) and a batch Amplitude failed to deliver is retried within
    #: minutes; five minutes covers a few retries with back-off, and costs only a five-minute
    #: delay, once, before answers stop needing a Profile API call. See :mod:`app.cohorts.rules`.
    settle_seconds: float = 300.0
    #: ``COHORT_REALTIME_IDS``: the cohorts synced with the real-time cadence, watched for silence.
    realtime_ids: tuple[str, ...] = ()
    #: ``COHORT_REALTIME_MAX_SILENCE_SECONDS``: how long a real-time cohort may go without a
    #: batch before it counts as silent (and the alert fires).
    realtime_max_silence_seconds: float = 900.0

    @classmethod
    def from_settings(cls, settings: Settings) -> CohortSettings:
        return cls(
            webhook_secrets=settings.cohort_webhook_secrets,
            settle_seconds=settings.cohort_settle_seconds,
            realtime_ids=settings.cohort_realtime_ids,
            realtime_max_silence_seconds=settings.cohort_realtime_max_silence_seconds,
        )

    @property
    def receiver_enabled(self) -> bool:
        return bool(self.webhook_secrets)
