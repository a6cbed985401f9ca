"""The Amplitude User Profile API client: one pooled session, bounded in time and size."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import requests
import urllib3
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate
from requests.adapters import HTTPAdapter

from app.clock import Deadline
from app.core.query import ProfileQuery, profile_from_user_data
from app.errors import RateLimited, UpstreamMisconfigured, UpstreamUnavailable, UserNotFound
from app.settings import Settings
from app.watchdog import Watchdog, WatchedHTTPSPool, WatchedPool, finish_watched_call

log = logging.getLogger(__name__)

UNKNOWN_USER_ERROR = "User id and device id not seen before"


class UpstreamThrottled(RateLimited):
    """Amplitude answered 429: the organisation's quota is spent for now."""

    message = "Amplitude's rate limit was reached; retry later"


class ItemId(fields.Field):
    """An item id: Amplitude documents strings; tolerate numbers, nothing else."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValidationError("item ids must be strings or numbers")
        return value


class RecommendationSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    rec_id = fields.String(required=True)
    items = fields.List(ItemId(), required=True, validate=validate.Length(max=1000))
    is_control = fields.Boolean(load_default=False)
    recommendation_source = fields.String(load_default=None, allow_none=True)
    last_updated = fields.Raw(load_default=None, allow_none=True)


class PropensitySchema(Schema):
    class Meta:
        unknown = EXCLUDE

    prop = fields.Raw(allow_none=True)
    pred_id = fields.String(required=True)
    prop_type = fields.String(load_default=None, allow_none=True)


class UserDataSchema(Schema):
    """The documented ``userData`` shape; anything else is an upstream failure."""

    class Meta:
        unknown = EXCLUDE

    recommendations = fields.List(fields.Nested(RecommendationSchema), allow_none=True, load_default=None)
    user_id = fields.Raw(allow_none=True, load_default=None)
    device_id = fields.Raw(allow_none=True, load_default=None)
    amp_props = fields.Dict(keys=fields.String(), allow_none=True, load_default=None)
    cohort_ids = fields.List(fields.Raw(), allow_none=True, load_default=None)
    propensity = fields.Raw(allow_none=True, load_default=None)
    propensities = fields.List(fields.Nested(PropensitySchema), allow_none=True, load_default=None)


_USER_DATA = UserDataSchema()


class AmplitudeClient:
    """Fetch one profile per call; every failure becomes a typed exception."""

    def __init__(self, settings: Settings, session: requests.Session | None = None) -> None:
        self.url = settings.upstream_profile_url
        self.timeouts = (settings.upstream_connect_timeout, settings.upstream_read_timeout)
        self.max_body = settings.upstream_max_body_bytes
        self.default_backoff = settings.upstream_429_backoff_seconds
        self.session = session or requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=settings.upstream_concurrency, max_retries=0)
        adapter.poolmanager.pool_classes_by_scheme = {"http": WatchedPool, "https": WatchedHTTPSPool}
        self.watchdog = Watchdog()
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        # Environment proxies would route the secret key through a third party.
        self.session.trust_env = False
        self.session.headers.update(
            {
                "Authorization": f"Api-Key {settings.amplitude_secret_key}",
                "Accept": "application/json",
                "User-Agent": "amplitude-braze-profile-proxy/1.0",
            }
        )

    def close(self) -> None:
        self.watchdog.close()
        self.session.close()

    def fetch(self, query: ProfileQuery, deadline: Deadline, send_by: float | None = None) -> dict[str, Any]:
        """Return the kept profile for *query*, giving up at *deadline*.

        *send_by* (monotonic): the call is not sent at all if it cannot start by then, so
        it reaches Amplitude within the admission window it was counted in.

        :raises UserNotFound: Amplitude has not seen the identity.
        :raises UpstreamMisconfigured: the key or URL is wrong (401, redirect).
        :raises UpstreamThrottled: Amplitude answered 429.
        :raises UpstreamUnavailable: timeout, connection error, 5xx or an undocumented body.
        """
        if send_by is not None and deadline.clock.monotonic() > send_by:
            raise RateLimited("the admitted slot passed before the call could leave", retry_after=1)
        status, headers, body = self._get(query, deadline)
        return self._interpret(query, status, headers, body)

    def _get(self, query: ProfileQuery, deadline: Deadline) -> tuple[int, Any, bytes]:
        connect, read = self.timeouts
        timeouts = (max(0.001, deadline.capped(connect)), max(0.001, deadline.capped(read)))
        # Socket timeouts bound each read, not the exchange: an answer that trickles in a
        # line at a time would hold this thread long past the deadline. The watchdog cuts
        # the connection at the deadline, whatever stage the exchange is in.
        with self.watchdog.watch(deadline.remaining()) as watched:
            try:
                return self._exchange(query, deadline, timeouts)
            except UpstreamUnavailable:
                if watched.was_cut:
                    raise UpstreamUnavailable("Amplitude did not answer within the deadline") from None
                raise

    def _exchange(
        self, query: ProfileQuery, deadline: Deadline, timeouts: tuple[float, float]
    ) -> tuple[int, Any, bytes]:
        try:
            # Redirects are never followed: the key must not travel to another host.
            with self.session.get(
                self.url, params=query.upstream_params(), timeout=timeouts, stream=True, allow_redirects=False
            ) as response:
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.max_body:
                    raise UpstreamUnavailable("Amplitude's answer is larger than the configured cap")
                chunks: list[bytes] = []
                size = 0
                # read1 returns whatever has arrived, so a body dribbled out byte by
                # byte is still bounded by the overall deadline, not just per-read timeouts.
                while chunk := response.raw.read1(65536, decode_content=True):
                    size += len(chunk)
                    if size > self.max_body:
                        raise UpstreamUnavailable("Amplitude's answer is larger than the configured cap")
                    if deadline.expired():
                        raise UpstreamUnavailable("Amplitude's answer took too long to arrive")
                    chunks.append(chunk)
                # Done with the socket before it goes back to the pool: the watchdog must not cut it now.
                finish_watched_call()
                return response.status_code, response.headers, b"".join(chunks)
        except (requests.Timeout, urllib3.exceptions.TimeoutError):
            raise UpstreamUnavailable("Amplitude timed out") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            # urllib3's protocol errors (truncated bodies, resets) surface under several roots.
            raise UpstreamUnavailable(f"Amplitude connection failed ({type(exc).__name__})") from None

    def _interpret(self, query: ProfileQuery, status: int, headers: Any, body: bytes) -> dict[str, Any]:
        payload: Any = None
        if body[:1] in (b"{", b"["):
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError:
                payload = None
        if isinstance(payload, dict) and payload.get("error") == UNKNOWN_USER_ERROR:
            raise UserNotFound()
        if status == 401:
            log.critical("Amplitude rejected the secret key (HTTP 401): check AMPLITUDE_SECRET_KEY")
            raise UpstreamMisconfigured()
        if 300 <= status < 400:
            log.critical("Amplitude answered a redirect (HTTP %d): check AMPLITUDE_API_URL", status)
            raise UpstreamMisconfigured("Amplitude redirected the request; the operator must fix AMPLITUDE_API_URL")
        if status == 429:
            raise UpstreamThrottled(
                retry_after=_retry_after_seconds(headers.get("Retry-After")) or self.default_backoff
            )
        if status != 200:
            raise UpstreamUnavailable(f"Amplitude answered HTTP {status}")
        if not isinstance(payload, dict) or not isinstance(payload.get("userData"), dict):
            raise UpstreamUnavailable("Amplitude's answer is not the documented JSON")
        try:
            user_data = _USER_DATA.load(payload["userData"])
        except ValidationError:
            raise UpstreamUnavailable("Amplitude's answer is not the documented JSON") from None
        return profile_from_user_data(user_data, query)


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds only; dates are rare here)."""
    if value and value.strip().isdigit():
        return float(min(int(value.strip()), 3600))
    return None
