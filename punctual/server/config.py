"""Server options: what the HTTP front end needs beyond the engine's own EngineConfig."""
from __future__ import annotations

from dataclasses import dataclass, field

from punctual.server.auth import ISOLATION_MODES


@dataclass
class ServerConfig:
    served_model_name: str  # the `model` clients name; requests naming another get 404
    api_key: str | None = None  # when set, every /v1 route needs `Authorization: Bearer <key>`
    # Several keys: key -> tenant (server/auth.py). Any of them opens the /v1 routes; the tenant
    # is the fair policy's unit and a metrics label. `api_key` joins them as tenant key-N.
    api_keys: dict[str, str] = field(default_factory=dict)
    # Whose requests may share prefix-cache blocks: none (any with the same client cache_salt),
    # api-key (a tenant's own), user (the `user` field's own). Prompt caching leaks prompts by
    # timing across whoever shares it ("Auditing Prompt Caching in Language Model APIs").
    prefix_cache_isolation: str = "none"
    # Queued + running requests (samples) beyond this get 429 at once: a bounded queue keeps the
    # latency of admitted requests predictable instead of growing without limit under overload.
    max_queue_len: int = 1024
    ttft_slo_ms: float | None = None  # default SLOs for requests that bring none
    tpot_slo_ms: float | None = None
    engine_start_timeout_s: float | None = None  # None: wait as long as the model takes to load
    shutdown_timeout_s: float = 5.0  # how long in-flight requests may run on after SIGTERM
    # LoRA adapters loaded at start-up (--lora-modules): (name, path) each; needs --enable-lora.
    lora_modules: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.api_key and self.api_key not in self.api_keys:
            self.api_keys = {**self.api_keys, self.api_key: f"key-{len(self.api_keys) + 1}"}
        if self.prefix_cache_isolation not in ISOLATION_MODES:
            raise ValueError(f"prefix_cache_isolation must be one of {', '.join(ISOLATION_MODES)}, "
                             f"got {self.prefix_cache_isolation!r}")
        if self.prefix_cache_isolation == "api-key" and not self.api_keys:
            raise ValueError("prefix_cache_isolation api-key needs API keys (--api-key or --api-key-file)")
        if self.max_queue_len < 1:
            raise ValueError(f"max_queue_len must be >= 1, got {self.max_queue_len}")
        names = [name for name, _ in self.lora_modules]
        if len(set(names)) != len(names):
            raise ValueError(f"lora_modules: a name is given twice in {names}")
        if self.served_model_name in names:
            raise ValueError(f"lora_modules: {self.served_model_name!r} is the base model's served name")
        for name in ("ttft_slo_ms", "tpot_slo_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
