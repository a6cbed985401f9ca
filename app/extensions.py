"""The long-lived objects one app owns, built once in the factory."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.auth import CallerKeys
from app.breaker import CircuitBreaker
from app.budget import CallerMissCaps, UpstreamBudget
from app.cache import ProfileCache
from app.observability import Metrics
from app.profile import QueryPlanner
from app.profiles import ProfileService
from app.redis_tier import RedisTier
from app.security import FailureBrake, NetworkAllowlist, parse_networks
from app.settings import Settings
from app.upstream import AmplitudeClient


@dataclass
class ProxyExtensions:
    """What ``app.extensions["profile_proxy"]`` holds."""

    settings: Settings
    caller_keys: CallerKeys
    admin_keys: CallerKeys
    planner: QueryPlanner
    redis: RedisTier | None
    budget: UpstreamBudget
    breaker: CircuitBreaker
    cache: ProfileCache
    profiles: ProfileService
    metrics: Metrics
    allowlist: NetworkAllowlist
    failure_brake: FailureBrake
    openapi: dict[str, Any] | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> ProxyExtensions:
        redis_tier = RedisTier(settings.redis_url, settings.redis_timeout_seconds) if settings.redis_url else None
        budget = UpstreamBudget(
            settings.upstream_rate_limit_per_minute, settings.upstream_budget_shares, redis_tier, clock=monotonic
        )
        breaker = CircuitBreaker(settings.breaker_failure_threshold, settings.breaker_cooldown_seconds, clock=monotonic)
        cache = ProfileCache(settings, redis_tier, clock=clock)
        client = AmplitudeClient(settings)
        metrics = Metrics()
        caller_caps = CallerMissCaps(
            settings.caller_miss_limit, settings.upstream_budget_shares, redis_tier, clock=monotonic
        )
        profiles = ProfileService(
            settings, client, cache, budget, breaker, metrics, caller_caps, clock=clock, monotonic=monotonic
        )
        return cls(
            settings=settings,
            caller_keys=CallerKeys(settings.caller_keys),
            admin_keys=CallerKeys(settings.admin_keys),
            planner=QueryPlanner(settings),
            redis=redis_tier,
            budget=budget,
            breaker=breaker,
            cache=cache,
            profiles=profiles,
            metrics=metrics,
            allowlist=NetworkAllowlist(parse_networks(settings.allowed_cidrs)),
            failure_brake=FailureBrake(settings.auth_failure_limit_per_minute, clock=monotonic),
        )

    def close(self) -> None:
        self.profiles.close()
        if self.redis is not None:
            self.redis.close()
