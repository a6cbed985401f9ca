"""The webhook receiver's refusals, each a typed :class:`app.errors.ApiError` the service answers as JSON."""

from __future__ import annotations

from app.errors import ApiError, InvalidRequest, ProfileApiUnavailable, RetryableError


class WebhookUnauthorized(ApiError):
    """No ``Authorization: Bearer`` header, or one naming no configured webhook secret."""

    code = 401
    error = "unauthorized"
    message = "missing or invalid webhook secret: send Authorization: Bearer SECRET (one of COHORT_WEBHOOK_SECRETS)"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="amplitude-cohort-webhooks"'})


class WebhookBodyTooLarge(ApiError):
    code = 413
    error = "request_too_large"
    message = "the batch is larger than the receiver accepts"


class InvalidBatch(InvalidRequest):
    """A body that is not a valid Cohort Webhooks batch (``400 invalid_request`` naming the field)."""


class CohortQueueUnavailable(RetryableError):
    """The shared tier could not queue the batch: Amplitude retries on anything but a 200."""

    error = "cohort_queue_unavailable"
    message = "the batch could not be queued; retry later"


class CohortStoreUnavailable(RetryableError):
    """The operators' routes could not read or change the store (Redis, or the machine's SQLite file)."""

    error = "cohort_store_unavailable"
    message = "the cohort store cannot be reached; retry later"


class CohortNotKept(ProfileApiUnavailable):
    """``AMPLITUDE_REGION=eu``, and the cohort is not (or not yet) answered from its webhooks."""

    error = "cohort_not_kept"

    def __init__(self, cohort_id: str) -> None:
        super().__init__(
            f"cohort {cohort_id} is not kept by Cohort Webhooks here, or not yet authoritative, and without the "
            "User Profile API (AMPLITUDE_REGION=eu) its membership cannot be answered"
        )
