"""Amplitude's Cohort Webhooks: the receiver, and the operators' view of the cohort store.

``POST /v1/webhooks/amplitude/cohorts`` takes one batch as Amplitude sends it, authenticated
by ``Authorization: Bearer`` one of ``COHORT_WEBHOOK_SECRETS`` (never a caller key) and
from any address (Amplitude has no fixed ones), and answers ``200`` once the batch is
queued in the shared tier: the applier applies it moments later. Operators read the store
and act on it with an admin key: open a new store, arm a cohort after a loss (see
:mod:`app.cohorts.membership`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from flask import Blueprint, Response, request

from app.cohorts.errors import CohortStoreUnavailable
from app.cohorts.payload import MAX_BODY_BYTES
from app.cohorts.service import CohortWebhooks
from app.errors import ApiError, json_response
from app.http import schemas
from app.http.routes import route
from app.http.trace import RequestTrace
from app.stores.shared import SharedUnavailable

T = TypeVar("T")

webhooks = Blueprint("webhooks", __name__)

_NO_STORE = {"Cache-Control": "no-store"}


class WebhooksNotConfigured(ApiError):
    code = 404
    error = "not_found"
    message = "cohort webhooks are not configured here (COHORT_WEBHOOK_SECRETS)"


def _cohorts(trace: RequestTrace) -> CohortWebhooks:
    if trace.extensions.cohorts is None:
        raise WebhooksNotConfigured()
    return trace.extensions.cohorts


def _in_store(action: Callable[[], T]) -> T:
    """Run an operator's read or change of the store; a store that cannot be reached is a 503, not a 500."""
    try:
        return action()
    except SharedUnavailable as exc:
        raise CohortStoreUnavailable() from exc


@route(
    webhooks, "/v1/webhooks/amplitude/cohorts", summary="Cohort Webhooks receiver", method="POST", auth="webhook",
    response=schemas.CohortReceipt,
    description="One batch of Amplitude's Cohort Webhooks destination (its default payload), with "
    "`Authorization: Bearer` one of COHORT_WEBHOOK_SECRETS. Answered once queued; a repeated `message_id` is "
    "answered `queued: false` and changes nothing.",
)  # fmt: skip
def receive_cohort_batch(trace: RequestTrace, args: Mapping[str, Any]) -> Response:
    cohorts = _cohorts(trace)
    declared = request.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        body = b""  # never read: the receiver refuses it (413) by its declared length, and counts the refusal
    else:
        # A body without a length (chunked) is read up to one byte past the bound, which is enough for the
        # receiver to refuse it; werkzeug's limit stops there without an error, so the bound alone would hand
        # over a truncated body that looks like malformed JSON (400) instead of a body too large.
        request.max_content_length = MAX_BODY_BYTES + 1
        body = request.get_data(cache=False)
    receipt = cohorts.receive(body, request.headers.get("Authorization"), declared)
    trace.caller = f"webhook{receipt.secret}"  # which secret: shows when an old one falls out of use
    return json_response({"queued": receipt.queued, "message_id": receipt.message_id}, headers=_NO_STORE)


@route(webhooks, "/v1/admin/cohorts", summary="Cohort store", auth="admin", response=schemas.CohortStoreResponse)
def cohort_store(trace: RequestTrace, args: Mapping[str, Any]) -> Response:
    """Every cohort the store knows, or that is declared real-time: authoritative or not, and why."""
    status = _in_store(_cohorts(trace).status)
    cohorts = [
        {name: value for name, value in dataclasses.asdict(cohort).items() if name in _STATUS_FIELDS}
        for cohort in status.cohorts
    ]
    opened = status.epoch is not None and status.epoch.opened_at is not None
    return json_response({"store": status.store, "opened": opened, "cohorts": cohorts}, headers=_NO_STORE)


_STATUS_FIELDS = frozenset(schemas.CohortStatusOut().fields)


@route(
    webhooks, "/v1/admin/cohorts/open", summary="Open the cohort store", method="POST", auth="operator",
    response=schemas.CohortStoreResponse,
    description="Once, on a new store no Amplitude sync targets yet: every cohort first heard of from now on is "
    "armed by its first batch (its full sync). Never on a store Amplitude already syncs to.",
)  # fmt: skip
def open_cohort_store(trace: RequestTrace, args: Mapping[str, Any]) -> Response:
    _in_store(_cohorts(trace).membership.open)
    return cohort_store(trace, args)


@route(
    webhooks, "/v1/admin/cohorts/<cohort_id>/arm", summary="Arm a cohort", method="POST", auth="operator",
    response=schemas.CohortStoreResponse,
    description="After a loss: forget the cohort's members and wait for its next full sync (see docs/cohorts.md).",
)  # fmt: skip
def arm_cohort(trace: RequestTrace, args: Mapping[str, Any], cohort_id: str) -> Response:
    membership = _cohorts(trace).membership
    _in_store(lambda: membership.arm(cohort_id))  # decoded and checked by the gate
    return cohort_store(trace, args)
