"""``RouterConfig``: everything ``fleetlm router`` can be told, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetlm.router.policies import PolicyConfig, check_policy
from fleetlm.router.replica import normalize_url


@dataclass(frozen=True)
class WorkerSpec:
    url: str
    kv_events_endpoint: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", normalize_url(self.url))
        if self.kv_events_endpoint is not None:
            from fleetlm.core.kv_events import check_endpoint

            check_endpoint(self.kv_events_endpoint)


@dataclass(frozen=True)
class RouterConfig:
    workers: tuple[WorkerSpec, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    policy: str = "round_robin"
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)
    session_header: str = "x-session-id"  # session policy: this header, else the body's "user"
    model: str | None = None  # tokenizer source (precise prefix mode hashes prompt tokens)
    block_size: int = 16  # the replicas' block size (precise mode)
    api_keys: tuple[str, ...] = ()  # clients must send one (empty: open)
    admin_keys: tuple[str, ...] = ()  # POST/DELETE /workers need one (empty: admin routes refused)
    worker_api_key: str | None = None  # sent to replicas (probes and requests) instead of the client's
    max_retries: int = 1  # a request that fails before its first token moves to another replica this often
    health_interval: float = 1.0
    health_timeout: float = 2.0
    startup_timeout: float = 120.0  # every worker given at start must be healthy by then (else exit 2)
    add_timeout: float = 30.0  # POST /workers waits this long for the new worker's health check
    breaker_failures: int = 3
    breaker_cooldown: float = 5.0
    connect_timeout: float = 5.0
    read_timeout: float = 600.0  # longest silence from a replica before its request fails
    shutdown_timeout: float = 30.0  # SIGTERM: in-flight requests get this long to finish
    max_body_bytes: int = 1 << 20
    tenants_file: str | None = None  # --tenants: API keys -> tenants and their limits, per router (router/tenants.py)

    def __post_init__(self) -> None:
        check_policy(self.policy)
        if self.policy == "prefix" and self.policy_config.prefix_mode == "precise":
            if self.model is None:
                raise ValueError("--prefix-mode precise needs --model (the replicas' tokenizer) to hash prompts")
        if self.tenants_file is not None and self.worker_api_key is not None:
            raise ValueError("--tenants cannot be used with --worker-api-key: the replicas must see each client's "
                             "key to apply its tenant's cache salt, fair share and limits")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, got {self.max_retries}")
        for name in ("health_interval", "health_timeout", "startup_timeout", "add_timeout", "breaker_cooldown",
                     "connect_timeout", "read_timeout", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.breaker_failures < 1:
            raise ValueError(f"--breaker-failures must be >= 1, got {self.breaker_failures}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two, got {self.block_size}")
        urls = [w.url for w in self.workers]
        dup = sorted({u for u in urls if urls.count(u) > 1})
        if dup:
            raise ValueError(f"worker {dup[0]} is given more than once")
