"""Typed, validated settings built once from the environment."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, validates_schema
from marshmallow import fields as mf
from marshmallow.validate import OneOf, Range

from app import braze_ranges

#: Fields whose values are secrets: never shown by ``repr`` or in an error.
SECRET_FIELDS = frozenset({"amplitude_secret_key", "caller_keys", "admin_keys", "cohort_webhook_secrets"})

#: Webhook secrets an operator generates (``openssl rand -hex 32``); a short one could be guessed.
MIN_WEBHOOK_SECRET_LENGTH = 16
#: Two are enough to rotate one while the other works; a few more do no harm.
MAX_WEBHOOK_SECRETS = 5
#: A cohort id as Amplitude shows it is a short token; a longer value is a mistake.
MAX_COHORT_ID_BYTES = 128

#: An admitted call that cannot start within this time of its slot is not sent at all.
SEND_ALLOWANCE_SECONDS = 0.1

_KEY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class SettingsError(Exception):
    """A setting is missing or invalid; the message names the variable."""


@dataclass(frozen=True)
class CallerKey:
    """A caller key and the name logs and metrics show instead of it."""

    name: str
    key: str = field(repr=False)


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    amplitude_secret_key: str = ""
    amplitude_region: str = "us"
    amplitude_api_url: str = "https://profile-api.amplitude.com"
    allow_insecure_upstream: bool = False
    caller_keys: tuple[CallerKey, ...] = ()
    allow_open_access: bool = False
    admin_keys: tuple[CallerKey, ...] = ()
    cache_ttl_seconds: float = 300.0
    cache_max_entries: int = 100_000
    negative_cache_ttl_seconds: float = 60.0
    stale_while_revalidate_seconds: float = 3600.0
    stale_if_error_seconds: float = 86_400.0
    profile_rec_ids: tuple[str, ...] = ()
    profile_prediction_ids: tuple[str, ...] = ()
    profile_propensity_type: str = "score"
    port: int = 8000
    upstream_rate_limit_per_minute: int = 600
    upstream_budget_shares: int = 1
    budget_max_wait_seconds: float = 1.0
    upstream_429_backoff_seconds: float = 30.0
    upstream_connect_timeout: float = 0.5
    upstream_read_timeout: float = 1.0
    upstream_max_body_bytes: int = 1_000_000
    upstream_concurrency: int = 32
    request_deadline_seconds: float = 1.5
    breaker_failure_threshold: int = 5
    breaker_cooldown_seconds: float = 10.0
    redis_url: str | None = None
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_service: str | None = None
    redis_timeout_seconds: float = 0.1
    shared_state_path: str | None = None
    allowed_cidrs: tuple[str, ...] = ()
    trusted_proxy_count: int = 0
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    auth_failure_limit_per_minute: int = 20
    caller_miss_limit_per_minute: int | None = None
    bulk_callers: tuple[str, ...] = ()
    recommendations_fetch: str = "with_profile"
    braze_failure_warn_share: float = 0.5
    braze_failure_warn_min: int = 300
    demo_mode: bool = False
    log_level: str = "INFO"
    access_log: bool = True
    log_user_ids: bool = False
    preview_page: bool = False
    cohort_webhook_secrets: tuple[str, ...] = ()
    cohort_settle_seconds: float = 300.0
    cohort_realtime_ids: tuple[str, ...] = ()
    cohort_realtime_max_silence_seconds: float = 900.0

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value:
                value = "<redacted>"
            elif f.name == "redis_url" and value:
                value = _redact_url_password(value)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @property
    def admission_window_seconds(self) -> float:
        """The window grants are counted in: 60 s, plus the time within which an admitted call
        reaches Amplitude or is never sent (it must start within ``SEND_ALLOWANCE_SECONDS`` of
        its slot and connect within the connect timeout), so Amplitude's 60 s never sees more."""
        return 60.0 + SEND_ALLOWANCE_SECONDS + self.upstream_connect_timeout

    @property
    def profile_api(self) -> bool:
        """Whether the User Profile API exists where the project's data lives (not in Amplitude's EU region)."""
        return self.amplitude_region == "us"

    @property
    def upstream_profile_url(self) -> str:
        return self.amplitude_api_url.rstrip("/") + "/v1/userprofile"


def _redact_url_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1<redacted>@", url)


class CommaList(mf.Field):
    """A comma-separated list of non-empty, trimmed strings."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, ...]:
        if not isinstance(value, str):
            raise ValidationError("must be a comma-separated string")
        items = tuple(part.strip() for part in value.split(",") if part.strip())
        if len(set(items)) != len(items):
            raise ValidationError("must not repeat an entry")
        return items


class CallerKeyList(mf.Field):
    """``name:key,name:key`` (names optional) into :class:`CallerKey` tuples."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[CallerKey, ...]:
        if not isinstance(value, str):
            raise ValidationError("must be a comma-separated string")
        keys: list[CallerKey] = []
        for position, entry in enumerate((e.strip() for e in value.split(",") if e.strip()), 1):
            name, sep, key = entry.partition(":")
            if not sep or not _KEY_NAME.match(name):
                name, key = f"key{position}", entry
            if len(key) < 8:
                # Never echo the value: name the position only.
                raise ValidationError(f"entry {position} ({name}) is shorter than 8 characters")
            if any(c.isspace() or ord(c) < 32 for c in key):
                raise ValidationError(f"entry {position} ({name}) contains whitespace or control characters")
            keys.append(CallerKey(name=name, key=key))
        if len({k.name for k in keys}) != len(keys):
            raise ValidationError("key names must be unique")
        return tuple(keys)


class CidrList(CommaList):
    """Comma-separated networks (``203.0.113.0/24``), single addresses, or ``braze:US-01`` cluster names."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, ...]:
        entries = super()._deserialize(value, attr, data, **kwargs)
        for entry in entries:
            if braze_ranges.is_named(entry):
                try:
                    braze_ranges.resolve(entry)
                except ValueError as exc:
                    raise ValidationError(str(exc)) from None
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValidationError(f"{entry!r} is not a network, an address or braze:CLUSTER") from None
        return entries


class SentinelList(mf.Field):
    """Comma-separated ``host:port`` addresses of Redis Sentinels (``[v6]:port`` for IPv6)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[tuple[str, int], ...]:
        addresses = []
        for entry in CommaList()._deserialize(value, attr, data, **kwargs):
            host, sep, port = entry.rpartition(":")
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValidationError(f"{entry!r} is not host:port")
            addresses.append((host, int(port)))
        return tuple(addresses)


class ProxyList(CommaList):
    """The proxies whose forwarded headers are believed: addresses or networks, never ``*``."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, ...]:
        entries = super()._deserialize(value, attr, data, **kwargs)
        for entry in entries:
            if entry == "*":
                raise ValidationError("'*' would believe any client: name the proxies' addresses or networks")
            try:
                # Strict, as gunicorn reads the same list: 10.0.0.1/8 is a mistake, not 10.0.0.0/8.
                ipaddress.ip_network(entry)
            except ValueError:
                raise ValidationError(f"{entry!r} is not a network (without host bits) or address") from None
        return entries


class SecretList(mf.Field):
    """Comma-separated secrets, each long and free of whitespace; never echoed in an error."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, ...]:
        if not isinstance(value, str):
            raise ValidationError("must be a comma-separated string")
        secrets = tuple(part.strip() for part in value.split(",") if part.strip())
        if len(secrets) > MAX_WEBHOOK_SECRETS:
            raise ValidationError(f"must list at most {MAX_WEBHOOK_SECRETS} secrets")
        for position, secret in enumerate(secrets, 1):
            if len(secret) < MIN_WEBHOOK_SECRET_LENGTH:
                raise ValidationError(f"entry {position} is shorter than {MIN_WEBHOOK_SECRET_LENGTH} characters")
            if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in secret) or not secret.isascii():
                raise ValidationError(f"entry {position} must be printable ASCII without spaces")
        if len(set(secrets)) != len(secrets):
            raise ValidationError("must not repeat a secret")
        return secrets


class CohortIdList(CommaList):
    """Comma-separated cohort ids, as Amplitude shows them on the cohort's page."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, ...]:
        ids = super()._deserialize(value, attr, data, **kwargs)
        for cohort_id in ids:
            if len(cohort_id.encode()) > MAX_COHORT_ID_BYTES or not cohort_id.isprintable():
                raise ValidationError(f"{cohort_id[:40]!r} is not a cohort id")
        return ids


def _not_blank(value: str) -> None:
    if not value.strip():
        raise ValidationError("must not be blank")


def _state_file(value: str) -> None:
    # The value is never echoed: one line names the variable and what is wrong.
    if not os.path.isabs(value):
        raise ValidationError("must be an absolute path")
    if not os.path.isdir(os.path.dirname(value)):
        raise ValidationError("its directory does not exist")
    if os.path.isdir(value):
        raise ValidationError("is a directory, not a file")


def _seconds(
    default: float, minimum: float = 0.0, maximum: float = 10**7, metadata: dict[str, str] | None = None
) -> mf.Float:
    return mf.Float(load_default=default, validate=Range(min=minimum, max=maximum), metadata=metadata)


def _count(default: int, minimum: int = 1, maximum: int = 10**9, metadata: dict[str, str] | None = None) -> mf.Integer:
    return mf.Integer(load_default=default, strict=False, validate=Range(min=minimum, max=maximum), metadata=metadata)


class SettingsSchema(Schema):
    """Environment variable names (upper case) mapped onto :class:`Settings`."""

    class Meta:
        unknown = EXCLUDE

    AMPLITUDE_SECRET_KEY = mf.String(
        load_default="",
        metadata={
            "description": "The Amplitude project's secret key. Only ever sent to Amplitude, in the `Authorization` "
            "header. Required unless `AMPLITUDE_REGION=eu`."
        },
    )
    AMPLITUDE_REGION = mf.String(
        load_default="us",
        validate=OneOf(["us", "eu"]),
        metadata={
            "description": "Where the Amplitude project's data lives. `eu`: the User Profile API does not exist there, "
            "so the service never calls it; cohort membership is answered from Cohort Webhooks alone and every other "
            "data route answers `404 profile_api_unavailable` (or the URL's `default`). See "
            "[EU mode](cohorts.md#eu-mode)."
        },
    )
    AMPLITUDE_API_URL = mf.Url(
        load_default="https://profile-api.amplitude.com",
        require_tld=False,
        schemes={"http", "https"},
        metadata={
            "description": "Base URL of the User Profile API; `/v1/userprofile` is appended. Must be https unless "
            "`ALLOW_INSECURE_UPSTREAM=true`."
        },
    )
    ALLOW_INSECURE_UPSTREAM = mf.Boolean(
        load_default=False, metadata={"description": "Allow an `http://` upstream (the local simulator only)."}
    )
    PROXY_API_KEYS = CallerKeyList(
        load_default=(),
        metadata={
            "description": "Caller keys, comma-separated, each optionally named: `braze:KEY1,curl:KEY2`. Several at "
            "once allow rotation. Each key is at least 8 characters. Required unless `ALLOW_OPEN_ACCESS=true`."
        },
    )
    ALLOW_OPEN_ACCESS = mf.Boolean(
        load_default=False,
        metadata={
            "description": "Run without caller keys. The service refuses to start without keys unless this is `true`."
        },
    )
    ADMIN_API_KEYS = CallerKeyList(
        load_default=(),
        metadata={
            "description": "Separate named keys for `/metrics` and the preview page, so Braze's key cannot open them. "
            "Without them a caller key can."
        },
    )
    CACHE_TTL_SECONDS = _seconds(300.0, minimum=1, metadata={"description": "How long a profile is fresh, in seconds."})
    CACHE_MAX_ENTRIES = _count(
        100_000, metadata={"description": "Bound of the in-process cache, in profiles, per worker process."}
    )
    NEGATIVE_CACHE_TTL_SECONDS = _seconds(
        60.0,
        metadata={
            "description": "How long a user Amplitude has not seen is remembered as unknown, in seconds (new users "
            "appear within minutes)."
        },
    )
    STALE_WHILE_REVALIDATE_SECONDS = _seconds(
        3600.0,
        metadata={
            "description": "After `CACHE_TTL_SECONDS`, how long the old profile is served at once while one background "
            "refresh runs. Older entries wait for a fresh answer (within the deadline)."
        },
    )
    STALE_IF_ERROR_SECONDS = _seconds(
        86_400.0,
        metadata={
            "description": "How long past freshness a profile may still be served when Amplitude fails or the budget "
            "is spent."
        },
    )
    PROFILE_REC_IDS = CommaList(
        load_default=(),
        metadata={"description": "Recommendation ids fetched with every profile, for example `rec_home,rec_email`."},
    )
    PROFILE_PREDICTION_IDS = CommaList(
        load_default=(),
        metadata={"description": "Prediction ids fetched with every profile, for example `pred_churn`."},
    )
    PROFILE_PROPENSITY_TYPE = mf.String(
        load_default="score",
        validate=OneOf(["score", "pct"]),
        metadata={"description": "`score` or `pct` for those predictions (Amplitude returns one type per call)."},
    )
    PORT = _count(8000, maximum=65535, metadata={"description": "The port gunicorn listens on (with `HOST`)."})
    UPSTREAM_RATE_LIMIT_PER_MINUTE = _count(
        600,
        metadata={
            "description": "The Amplitude budget, in calls per minute. Lower it when other systems use the same "
            "organisation's quota; raise it if Amplitude raised yours."
        },
    )
    UPSTREAM_BUDGET_SHARES = _count(
        1,
        maximum=10_000,
        metadata={
            "description": "The smallest fleet a process assumes before it has counted the fleet in the shared tier "
            "(Redis or the SQLite file), and so its share (limit / shares) while it cannot reach the tier; with "
            "neither, each process's share. `gunicorn.conf.py` sets it to its worker count; with several instances and "
            "no Redis, set it to the total number of worker processes (see [Running several "
            "processes](operations.md#running-several-processes-and-instances))."
        },
    )
    BUDGET_MAX_WAIT_SECONDS = _seconds(
        1.0,
        maximum=1.4,
        metadata={
            "description": "The longest a live request waits for its slot in the budget; it never waits past what its "
            "deadline leaves for the call (`REQUEST_DEADLINE_SECONDS` less 0.5 s). At the steady rate a slot frees "
            "every 60 s / limit (0.5 s at 120 a minute), so the default reaches the next slot at any limit of 60 a "
            "minute or more."
        },
    )
    UPSTREAM_429_BACKOFF_SECONDS = _seconds(
        30.0,
        minimum=1,
        maximum=3600,
        metadata={"description": "Pause after a 429 from Amplitude that has no `Retry-After`."},
    )
    UPSTREAM_CONNECT_TIMEOUT = _seconds(
        0.5,
        minimum=0.01,
        maximum=1.4,
        metadata={
            "description": "Connect timeout of an Amplitude call, in seconds. The budget counts grants in a window of "
            "60.1 s plus this."
        },
    )
    UPSTREAM_READ_TIMEOUT = _seconds(
        1.0,
        minimum=0.01,
        maximum=1.4,
        metadata={"description": "Read timeout of an Amplitude call (each read), in seconds."},
    )
    UPSTREAM_MAX_BODY_BYTES = _count(
        1_000_000, minimum=1024, metadata={"description": "Larger Amplitude answers are treated as failures."}
    )
    UPSTREAM_CONCURRENCY = _count(
        32,
        maximum=1024,
        metadata={
            "description": "Connections kept open to Amplitude, and threads for background refreshes, per process."
        },
    )
    REQUEST_DEADLINE_SECONDS = _seconds(
        1.5,
        minimum=0.1,
        maximum=1.9,
        metadata={
            "description": "Every response is sent within this time of arrival (Braze gives 2 s). An upstream call is "
            "cut at the same deadline, whatever stage it is in."
        },
    )
    BREAKER_FAILURE_THRESHOLD = _count(
        5, metadata={"description": "Consecutive upstream failures that open the circuit."}
    )
    BREAKER_COOLDOWN_SECONDS = _seconds(
        10.0,
        minimum=0.1,
        maximum=3600,
        metadata={"description": "How long the circuit stays open before one probe call goes through."},
    )
    REDIS_URL = mf.String(
        load_default=None,
        allow_none=True,
        metadata={
            "description": "For example `redis://redis:6379/0`: share cache, budget, back-off and single-flight across "
            "processes and instances. Not with `REDIS_SENTINELS`."
        },
    )
    REDIS_SENTINELS = SentinelList(
        load_default=(),
        metadata={
            "description": "Instead of `REDIS_URL`: Redis Sentinels as `host:port,host:port,...`, asked for the "
            "primary of `REDIS_SENTINEL_SERVICE` at each new connection, so a failover is followed without a "
            "restart (see [Redis Sentinel](operations.md#redis-sentinel))."
        },
    )
    REDIS_SENTINEL_SERVICE = mf.String(
        load_default=None,
        allow_none=True,
        validate=_not_blank,
        metadata={"description": "The name the sentinels monitor the primary under (`sentinel monitor NAME ...`)."},
    )
    REDIS_TIMEOUT_SECONDS = _seconds(
        0.1,
        minimum=0.005,
        maximum=1.0,
        metadata={"description": "Redis socket timeout; a slow or absent Redis is skipped, never waited on."},
    )
    SHARED_STATE_PATH = mf.String(
        load_default=None,
        allow_none=True,
        validate=_state_file,
        metadata={
            "description": "An absolute path to this machine's SQLite file. Without Redis, the processes of this "
            "machine share cache, budget, back-off and single-flight through it; with Redis, they keep in it a copy "
            "of the grants Redis gave them, and go on through it when Redis goes away while this machine was the "
            "whole fleet. When it is not set, `gunicorn.conf.py` makes one in a private temporary directory (with "
            "several workers, or with Redis), kept across a `USR2` upgrade and removed when the last master exits; "
            "name a file (in an existing directory, owned by the service's user) to keep it across restarts (see "
            "[Running several processes](operations.md#running-several-processes-and-instances))."
        },
    )
    ALLOWED_CIDRS = CidrList(
        load_default=(),
        metadata={
            "description": "Who may call: networks, addresses and Braze clusters by name, mixed: "
            "`braze:US-01,203.0.113.0/24,198.51.100.7`. `braze:` and the cluster as Braze writes it (`US-01` to "
            "`US-08`, `US-10`, `EU-01`, `EU-02`, `AU-01`, `ID-01`, `JP-01`, `KR-01`) stands for the addresses Braze "
            "publishes for that cluster (see [Security](operations.md#security)). Others get 403 before any other "
            "work; `/healthz` and `/readyz` stay open for probes. Empty: everyone may call."
        },
    )
    TRUSTED_PROXY_COUNT = mf.Integer(
        load_default=0,
        strict=False,
        validate=Range(min=0, max=10),
        metadata={
            "description": "How many proxies append to `X-Forwarded-For` in front of the service (the front counts: "
            "`make run-prod`, compose and Kubernetes set `1`). The client address is the entry that many places from "
            "the right, and only when the connection comes from `FORWARDED_ALLOW_IPS`; anyone else's header is "
            "ignored."
        },
    )
    FORWARDED_ALLOW_IPS = ProxyList(
        load_default=("127.0.0.1", "::1"),
        metadata={
            "description": "The proxies (addresses or networks, never `*`) whose forwarded headers count: one list for "
            "gunicorn (`X-Forwarded-Proto`) and the app (`X-Forwarded-For`, and the front's `X-Request-Start`)."
        },
    )
    AUTH_FAILURE_LIMIT_PER_MINUTE = _count(
        20,
        minimum=0,
        metadata={
            "description": "Failed authentications per address and minute; past it, further failures from that address "
            "get 429 at once (valid keys still pass). `0` turns the brake off."
        },
    )
    CALLER_MISS_LIMIT_PER_MINUTE = mf.Integer(load_default=None, allow_none=True, strict=False,
                                              validate=Range(min=1), metadata={"description":
        "Upstream calls one caller key may cause per minute (per process's share), an abuse guard against a leaked "
        "key streaming random ids. Off when empty: on a single-caller deployment it could only waste "
        "budget."})  # fmt: skip
    BULK_CALLERS = CommaList(
        load_default=(),
        metadata={
            "description": "Caller key names (from `PROXY_API_KEYS`) whose lookups are bulk work, for example `warm` "
            "(see [Live before bulk](templates.md#live-before-bulk))."
        },
    )
    RECOMMENDATIONS_FETCH = mf.String(
        load_default="with_profile",
        validate=OneOf(["with_profile", "when_asked"]),
        metadata={
            "description": "`with_profile`: the configured recommendations come with every profile (one call per user "
            "answers every route). `when_asked`: only recommendation and whole-profile routes ask Amplitude for them "
            "(see [Recommendation exposure](templates.md#recommendation-exposure))."
        },
    )
    BRAZE_FAILURE_WARN_SHARE = mf.Float(
        load_default=0.5,
        validate=Range(min=0.01, max=1.0),
        metadata={
            "description": "Log a warning when, in the last minute, at least this share of answers were ones Braze "
            "counts as failures (and at least `BRAZE_FAILURE_WARN_MIN` of them)."
        },
    )
    BRAZE_FAILURE_WARN_MIN = _count(
        300, minimum=1, metadata={"description": "The fewest failures in the last minute for that warning."}
    )
    DEMO_MODE = mf.Boolean(
        load_default=False,
        metadata={"description": "Set by `make run` when it serves simulator data; only changes the start-up log."},
    )
    LOG_LEVEL = mf.String(
        load_default="INFO",
        validate=OneOf(["DEBUG", "INFO", "WARNING", "ERROR"]),
        metadata={"description": "`DEBUG`, `INFO`, `WARNING` or `ERROR`."},
    )
    ACCESS_LOG = mf.Boolean(load_default=True, metadata={"description": "One JSON line per request on stdout."})
    LOG_USER_IDS = mf.Boolean(
        load_default=False,
        metadata={"description": "Put the user or device id in access lines (off: only the route template)."},
    )
    PREVIEW_PAGE = mf.Boolean(
        load_default=False,
        metadata={
            "description": "Serve the template preview page at `GET /preview` (see [The page](templates.md#the-page))."
        },
    )
    COHORT_WEBHOOK_SECRETS = SecretList(
        load_default=(),
        metadata={
            "description": "Secrets Amplitude's Cohort Webhooks destination sends as `Authorization: Bearer SECRET` "
            "(comma-separated, so one can be rotated while the other still works; each at least "
            f"{MIN_WEBHOOK_SECRET_LENGTH} characters, never a caller or admin key). Without one, "
            "`POST /v1/webhooks/amplitude/cohorts` answers 404. See [Cohort webhooks](cohorts.md)."
        },
    )
    COHORT_SETTLE_SECONDS = _seconds(
        300.0,
        minimum=1,
        maximum=86_400,
        metadata={
            "description": "Quiet, in seconds, after the last batch of a cohort's full sync before the cohort is "
            "authoritative (answered from the webhooks alone). Batches of one sync follow each other within seconds "
            "and a batch Amplitude failed to deliver is retried within minutes."
        },
    )
    COHORT_REALTIME_IDS = CohortIdList(
        load_default=(),
        metadata={
            "description": "Cohorts synced with Amplitude's real-time cadence: watched, and alerted on when silent "
            "for longer than `COHORT_REALTIME_MAX_SILENCE_SECONDS`."
        },
    )
    COHORT_REALTIME_MAX_SILENCE_SECONDS = _seconds(
        900.0,
        minimum=60,
        maximum=30 * 86_400,
        metadata={
            "description": "How long a real-time cohort may go without a batch before it counts as silent. "
            "Amplitude checks every minute but sends only changes, so a quiet cohort is silent too."
        },
    )

    @validates_schema
    def _check_bulk_callers(self, data: dict[str, Any], **kwargs: Any) -> None:
        names = {key.name for key in data.get("PROXY_API_KEYS") or ()}
        unknown = [name for name in data.get("BULK_CALLERS") or () if name not in names]
        if unknown:
            raise ValidationError(f"names no key in PROXY_API_KEYS: {', '.join(sorted(unknown))}", "BULK_CALLERS")

    @validates_schema
    def _check_webhook_secrets(self, data: dict[str, Any], **kwargs: Any) -> None:
        # Amplitude's secret and Braze's key travel in the same header: one value for both
        # would let a caller write batches (and Amplitude read profiles).
        secrets = set(data.get("COHORT_WEBHOOK_SECRETS") or ())
        for variable in ("PROXY_API_KEYS", "ADMIN_API_KEYS"):
            if secrets & {key.key for key in data.get(variable) or ()}:
                raise ValidationError(f"must not repeat a key of {variable}", "COHORT_WEBHOOK_SECRETS")

    @validates_schema
    def _check_combinations(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("AMPLITUDE_REGION", "us") == "us" and not (data.get("AMPLITUDE_SECRET_KEY") or "").strip():
            raise ValidationError(
                "is required (the User Profile API needs it; only AMPLITUDE_REGION=eu runs without it)",
                "AMPLITUDE_SECRET_KEY",
            )
        if not data.get("PROXY_API_KEYS") and not data.get("ALLOW_OPEN_ACCESS"):
            raise ValidationError(
                "no caller keys: set PROXY_API_KEYS, or ALLOW_OPEN_ACCESS=true to run without authentication",
                "PROXY_API_KEYS",
            )
        url = data.get("AMPLITUDE_API_URL", "")
        if url.lower().startswith("http://") and not data.get("ALLOW_INSECURE_UPSTREAM"):
            raise ValidationError(
                "must be https (set ALLOW_INSECURE_UPSTREAM=true only for a local simulator)",
                "AMPLITUDE_API_URL",
            )
        redis_url = data.get("REDIS_URL")
        if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValidationError("must start with redis://, rediss:// or unix://", "REDIS_URL")
        if redis_url and data.get("REDIS_SENTINELS"):
            raise ValidationError("set REDIS_URL or REDIS_SENTINELS, not both", "REDIS_SENTINELS")
        if bool(data.get("REDIS_SENTINELS")) != bool(data.get("REDIS_SENTINEL_SERVICE")):
            raise ValidationError("REDIS_SENTINELS and REDIS_SENTINEL_SERVICE go together", "REDIS_SENTINEL_SERVICE")


def first_problem(exc: ValidationError) -> tuple[str, str]:
    """The first field (in name order) a marshmallow error names, and what is wrong with it."""
    messages = exc.normalized_messages()
    name = sorted(messages)[0]
    detail = messages[name]
    if isinstance(detail, list):
        detail = "; ".join(str(d) for d in detail)
    return name, str(detail)


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Build :class:`Settings` from an environment mapping.

    :raises SettingsError: naming the first bad variable, without its value.
    """
    relevant = {k: v for k, v in environ.items() if k in SettingsSchema().fields and v != ""}
    try:
        loaded = SettingsSchema().load(relevant)
    except ValidationError as exc:
        name, detail = first_problem(exc)
        raise SettingsError(f"{name}: {detail}") from None
    renamed = {"PROXY_API_KEYS": "caller_keys", "ADMIN_API_KEYS": "admin_keys"}
    return Settings(**{renamed.get(key, key.lower()): value for key, value in loaded.items()})
