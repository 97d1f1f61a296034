"""Server options: what the HTTP front end needs beyond the engine's own EngineConfig."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    served_model_name: str  # the `model` clients name; requests naming another get 404
    api_key: str | None = None  # when set, every /v1 route needs `Authorization: Bearer <key>`
    # Queued + running requests (samples) beyond this get 429 at once: a bounded queue keeps the
    # latency of admitted requests predictable instead of growing without limit under overload.
    max_queue_len: int = 1024
    ttft_slo_ms: float | None = None  # default SLOs for requests that bring none
    tpot_slo_ms: float | None = None
    engine_start_timeout_s: float | None = None  # None: wait as long as the model takes to load
    shutdown_timeout_s: float = 5.0  # how long in-flight requests may run on after SIGTERM

    def __post_init__(self) -> None:
        if self.max_queue_len < 1:
            raise ValueError(f"max_queue_len must be >= 1, got {self.max_queue_len}")
        for name in ("ttft_slo_ms", "tpot_slo_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
