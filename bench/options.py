"""The harness's knobs, with full and ``--quick`` defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SCENARIOS = ("first", "stampede", "miss", "campaign", "memory")
#: ``GUNICORN_WORKER_CLASS`` values compared side by side.
WORKER_CLASSES = ("gevent", "gthread")


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
    # gunicorn (the same for the service and the bare app)
    worker_classes: tuple[str, ...] = WORKER_CLASSES
    gthread_threads: int = 256
    workers: int | None = None  # WEB_CONCURRENCY; None: gunicorn.conf.py's default (one per core)
    service_env: dict[str, str] = field(default_factory=dict)
    # first answers (and the repeated-URL mix, measured beside them)
    connections: tuple[int, ...] = (64,)
    repeat_connections: int = 64
    users: int = 3000  # cached users of the repeated-URL mix
    # stampede
    stampede_hit_connections: int = 500
    stampede_miss_connections: int = 500
    stampede_latency_ms: float = 300.0
    stampede_runs: int = 5
    stampede_pause: float = 3.0  # seconds between bursts
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
            duration=2.0,
            users=300,
            stampede_runs=1,
            miss_connections=(16,),
            campaign_recipients=400,
            campaign_seconds=5.0,
            campaign_rate_per_minute=500,
            campaign_concurrency=32,
            memory_profiles=5_000,
            memory_http_profiles=0,
        )
