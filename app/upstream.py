"""The Amplitude User Profile API client: one connection pool, bounded in time and size.

A miss spends most of its CPU here, and every miss holds the GIL while it does, so this
path is kept lean: urllib3's pool directly (requests' session machinery cost about as much
as the exchange itself), and the answer decoded and checked against the documented shape
in one pass by msgspec, in C, instead of a marshmallow schema walking every item id.
"""

from __future__ import annotations

import http.client
import logging
from typing import Annotated, Any, Required, TypedDict

import certifi
import msgspec
import orjson
import urllib3

from app.clock import Deadline
from app.core.query import ProfileQuery, profile_from_user_data
from app.errors import RateLimited, UpstreamMisconfigured, UpstreamUnavailable, UserNotFound
from app.settings import Settings
from app.watchdog import Watchdog, WatchedHTTPSPool, WatchedPool, finish_watched_call

log = logging.getLogger(__name__)

UNKNOWN_USER_ERROR = "User id and device id not seen before"

#: At most this many items per recommendation (Amplitude documents 100).
MAX_ITEMS = 1000


class UpstreamLate(UpstreamUnavailable):
    """No answer in what was left of the request's deadline, which was less than the read timeout.

    The call started late (the request had waited: on a budget slot, or for CPU in a
    stampede), so a timeout says nothing of Amplitude: it does not count towards opening
    the circuit, which would turn one busy moment into ten seconds without any call.
    """

    message = "Amplitude did not answer in what was left of the deadline"


class UpstreamThrottled(RateLimited):
    """Amplitude answered 429: the organisation's quota is spent for now."""

    message = "Amplitude's rate limit was reached; retry later"


# The documented ``userData`` shape; anything else is an upstream failure. Unknown keys are
# ignored; a key left out stays out (``profile_from_user_data`` reads with ``.get``).
# Item ids: Amplitude documents strings; numbers are tolerated, nothing else (not booleans).


class _Recommendation(TypedDict, total=False):
    rec_id: Required[str]
    items: Required[Annotated[list[str | int | float], msgspec.Meta(max_length=MAX_ITEMS)]]
    is_control: bool
    recommendation_source: str | None
    last_updated: Any


class _Propensity(TypedDict, total=False):
    prop: Any
    pred_id: Required[str]
    prop_type: str | None


class _UserData(TypedDict, total=False):
    recommendations: list[_Recommendation] | None
    user_id: Any
    device_id: Any
    amp_props: dict[str, Any] | None
    cohort_ids: list[Any] | None
    propensity: Any
    propensities: list[_Propensity] | None


class _Answer(TypedDict, total=False):
    userData: _UserData
    error: Any


_DECODER = msgspec.json.Decoder(_Answer)


class _OutOfTime(Exception):
    """A socket timeout, or the deadline passed while the answer arrived (told apart in ``_get``)."""


class AmplitudeClient:
    """Fetch one profile per call; every failure becomes a typed exception."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.upstream_profile_url
        self.timeouts = (settings.upstream_connect_timeout, settings.upstream_read_timeout)
        self.max_body = settings.upstream_max_body_bytes
        self.default_backoff = settings.upstream_429_backoff_seconds
        # One pool for Amplitude's host, used directly (a pool manager would parse and
        # re-encode every URL twice). No retries and no redirects (the key must not travel
        # to another host); urllib3 reads no proxy settings from the environment, which
        # would route the key through a third party. Certificates are checked against
        # certifi's bundle, as requests does.
        target = urllib3.util.parse_url(self.url)
        tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED", "ca_certs": certifi.where()}
        pool_class, options = (WatchedHTTPSPool, tls) if target.scheme == "https" else (WatchedPool, {})
        if not target.host:  # settings validated the URL
            raise ValueError("AMPLITUDE_API_URL has no host")
        self.pool = pool_class(
            target.host,
            target.port,
            maxsize=settings.upstream_concurrency,
            block=False,
            retries=False,
            headers={
                "Authorization": f"Api-Key {settings.amplitude_secret_key}",
                "Accept": "application/json",
                "Accept-Encoding": "gzip, deflate",
                "User-Agent": "amplitude-braze-profile-proxy/1.0",
            },
            **options,
        )
        self.path = target.path or "/"
        self.watchdog = Watchdog()

    def close(self) -> None:
        self.watchdog.close()
        self.pool.close()

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
        timeout = urllib3.Timeout(connect=max(0.001, deadline.capped(connect)), read=max(0.001, deadline.capped(read)))
        # Whether Amplitude had the whole read timeout to answer: if not, running out of time
        # is the request's lateness rather than Amplitude's failure (UpstreamLate).
        full_time = deadline.remaining() >= read
        # Socket timeouts bound each read, not the exchange: an answer that trickles in a
        # line at a time would hold this thread long past the deadline. The watchdog cuts
        # the connection at the deadline, whatever stage the exchange is in.
        with self.watchdog.watch(deadline.remaining()) as watched:
            try:
                return self._exchange(query, deadline, timeout)
            except _OutOfTime:
                if not full_time:
                    raise UpstreamLate() from None
                raise UpstreamUnavailable("Amplitude did not answer within the deadline") from None
            except UpstreamUnavailable:
                if not watched.was_cut:
                    raise
                if not full_time:
                    raise UpstreamLate() from None
                raise UpstreamUnavailable("Amplitude did not answer within the deadline") from None

    def _exchange(self, query: ProfileQuery, deadline: Deadline, timeout: urllib3.Timeout) -> tuple[int, Any, bytes]:
        target = f"{self.path}?{query.upstream_query()}"
        response = None
        complete = False
        try:
            response = self.pool.urlopen(
                "GET", target, timeout=timeout, preload_content=False, redirect=False, retries=False
            )
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.max_body:
                raise UpstreamUnavailable("Amplitude's answer is larger than the configured cap")
            chunks: list[bytes] = []
            size = 0
            # read1 returns whatever has arrived, so a body dribbled out byte by
            # byte is still bounded by the overall deadline, not just per-read timeouts.
            while chunk := response.read1(65536, decode_content=True):
                size += len(chunk)
                if size > self.max_body:
                    raise UpstreamUnavailable("Amplitude's answer is larger than the configured cap")
                if deadline.expired():
                    raise _OutOfTime()
                chunks.append(chunk)
            # Done with the socket before it goes back to the pool: the watchdog must not cut it now.
            finish_watched_call()
            complete = True
            return response.status, response.headers, b"".join(chunks)
        except urllib3.exceptions.TimeoutError:
            raise _OutOfTime() from None
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError, ValueError) as exc:
            # urllib3's protocol errors (truncated bodies, resets) surface under several roots.
            raise UpstreamUnavailable(f"Amplitude connection failed ({type(exc).__name__})") from None
        finally:
            if response is not None:
                if not complete:  # a half-read answer: the connection cannot be reused
                    response.close()
                response.release_conn()

    def _interpret(self, query: ProfileQuery, status: int, headers: Any, body: bytes) -> dict[str, Any]:
        answer: Any = None
        documented = False
        if body[:1] == b"{":
            try:
                answer, documented = _DECODER.decode(body), True
            except msgspec.ValidationError:  # JSON, not the documented shape: an error body?
                answer = _loose_json(body)
            except msgspec.DecodeError:
                answer = None
        if isinstance(answer, dict) and answer.get("error") == UNKNOWN_USER_ERROR:
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
        if not documented or "userData" not in answer:
            raise UpstreamUnavailable("Amplitude's answer is not the documented JSON")
        return profile_from_user_data(answer["userData"], query)


def _loose_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds only; dates are rare here)."""
    if value and value.strip().isdigit():
        return float(min(int(value.strip()), 3600))
    return None
