"""The harness's knobs, with full and ``--quick`` defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SCENARIOS = ("hit", "miss", "campaign", "memory")


@dataclass
class Options:
    only: tuple[str, ...] = SCENARIOS
    quick: bool = False
    runs: int = 5
    duration: float = 10.0
    wrk_threads: int = 2
    out_dir: Path = Path("docs")
    json_path: Path | None = None
    write_docs: bool = True
    # hit path
    connections: tuple[int, ...] = (16, 64, 256)
    users: int = 3000
    hit_targets: tuple[str, ...] = ("service", "bare", "bare_2x16", "service_default")
    service_workers: int = 1
    service_threads: int = 32
    # miss path
    miss_connections: tuple[int, ...] = (1, 16)
    miss_latency_ms: float = 100.0
    # campaign
    campaign_recipients: int = 20_000
    campaign_seconds: float = 60.0
    campaign_rate_per_minute: int = 500
    campaign_concurrency: int = 64
    campaign_tags: int = 3
    campaign_latency_ms: float = 100.0
    campaign_modes: tuple[str, ...] = ("paced", "blast")
    # memory
    memory_profiles: int = 100_000
    memory_http_profiles: int = 20_000
    notes: list[str] = field(default_factory=list)

    @classmethod
    def quick_defaults(cls) -> Options:
        return cls(
            quick=True,
            runs=1,
            duration=1.0,
            connections=(64, 256),
            hit_targets=("service", "bare", "bare_2x16"),
            miss_connections=(16,),
            users=300,
            campaign_recipients=400,
            campaign_seconds=5.0,
            campaign_rate_per_minute=500,
            campaign_concurrency=32,
            memory_profiles=5_000,
            memory_http_profiles=0,
        )
