"""The long-lived objects one app owns, built once in the factory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.admission import Admission
from app.braze_health import BrazeFailureWatch
from app.budget import CallerMissCaps, UpstreamBudget
from app.clock import SYSTEM_CLOCK, Clock
from app.cohorts.service import CohortWebhooks
from app.core.breaker import CircuitBreaker
from app.core.freshness import Freshness
from app.core.query import QueryPlanner
from app.gauges import GaugePublisher
from app.http.auth import CallerKeys
from app.http.security import FailureBrake, NetworkAllowlist, parse_networks
from app.lookup import ProfileLookup
from app.machine import MachineLog
from app.metrics import Metrics
from app.settings import Settings
from app.stores.profiles import ProfileStore
from app.stores.redis import RedisTier
from app.stores.redis_shared import RedisShared
from app.stores.shared import SharedTier
from app.stores.sqlite import SqliteShared
from app.stores.sqlite_machine import MachineFile
from app.upstream import AmplitudeClient


@dataclass
class ProxyExtensions:
    """What ``app.extensions["profile_proxy"]`` holds."""

    settings: Settings
    clock: Clock
    caller_keys: CallerKeys
    admin_keys: CallerKeys
    planner: QueryPlanner
    redis: RedisTier | None
    budget: UpstreamBudget
    breaker: CircuitBreaker
    profile_store: ProfileStore
    profile_lookup: ProfileLookup
    metrics: Metrics
    allowlist: NetworkAllowlist
    failure_brake: FailureBrake
    braze_watch: BrazeFailureWatch
    gauges: GaugePublisher
    openapi: dict[str, Any] | None = None
    shared: SharedTier | None = None  # Redis, else the machine's SQLite file, else nothing
    state_file: SqliteShared | None = None  # the machine's SQLite file: the shared tier, or beside Redis
    cohorts: CohortWebhooks | None = None  # with COHORT_WEBHOOK_SECRETS only

    @classmethod
    def build(cls, settings: Settings, clock: Clock = SYSTEM_CLOCK) -> ProxyExtensions:
        redis_tier = RedisTier.from_settings(settings, clock)
        shared: SharedTier | None = RedisShared(redis_tier) if redis_tier is not None else None
        state_file: SqliteShared | None = None
        machine: MachineLog | None = None
        if settings.shared_state_path:
            # Waits for the file take at most a third of the deadline, leaving the rest to Amplitude.
            timeout = settings.request_deadline_seconds / 3
            if shared is None:
                shared = state_file = SqliteShared(settings.shared_state_path, clock, timeout=timeout)
            else:  # beside Redis: a copy of the machine's grants, its way on without Redis (app.machine)
                machine_file = MachineFile(settings.shared_state_path, clock, timeout=timeout)
                machine, state_file = MachineLog(machine_file, clock), machine_file
        window = settings.admission_window_seconds
        budget = UpstreamBudget(
            settings.upstream_rate_limit_per_minute,
            settings.upstream_budget_shares,
            shared,
            clock=clock,
            window=window,
            machine=machine,
        )
        breaker = CircuitBreaker(settings.breaker_failure_threshold, settings.breaker_cooldown_seconds, clock=clock)
        # A claim outlives the longest call it covers, so it is never released by expiry mid-call.
        claim_ttl = settings.request_deadline_seconds + settings.upstream_read_timeout
        store = ProfileStore(Freshness.from_settings(settings), settings.cache_max_entries, claim_ttl, shared, clock)
        metrics = Metrics(shared_budget=shared is not None)
        braze_watch = BrazeFailureWatch(
            metrics, clock, settings.braze_failure_warn_share, settings.braze_failure_warn_min
        )
        gauges = GaugePublisher(metrics, breaker, budget, braze_watch, redis_tier, state_file)
        if metrics.multiprocess:
            gauges.start()  # other workers answer some of the scrapes: keep this one's gauges current
        caller_caps = CallerMissCaps(
            settings.caller_miss_limit_per_minute, settings.upstream_budget_shares, window, clock=clock
        )
        admission = Admission(
            breaker, budget, caller_caps, metrics, clock, settings.budget_max_wait_seconds, settings.bulk_callers
        )
        profiles = ProfileLookup(
            store,
            admission,
            AmplitudeClient(settings),
            clock,
            call_seconds=settings.request_deadline_seconds,
            concurrency=settings.upstream_concurrency,
            profile_api=settings.profile_api,
        )
        cohorts = CohortWebhooks(settings, redis_tier, metrics, clock) if settings.cohort_webhook_secrets else None
        return cls(
            settings=settings,
            clock=clock,
            caller_keys=CallerKeys(settings.caller_keys),
            admin_keys=CallerKeys(settings.admin_keys),
            planner=QueryPlanner(settings),
            redis=redis_tier,
            budget=budget,
            breaker=breaker,
            profile_store=store,
            profile_lookup=profiles,
            metrics=metrics,
            allowlist=NetworkAllowlist(parse_networks(settings.allowed_cidrs)),
            failure_brake=FailureBrake(settings.auth_failure_limit_per_minute, clock=clock),
            braze_watch=braze_watch,
            gauges=gauges,
            shared=shared,
            state_file=state_file,
            cohorts=cohorts,
        )

    def close(self) -> None:
        if self.cohorts is not None:
            self.cohorts.close()
        self.gauges.close()
        self.budget.close()
        self.profile_lookup.close()
        if self.shared is not None:
            self.shared.close()  # and the Redis tier under it
        if self.state_file is not None and self.state_file is not self.shared:
            self.state_file.close()
