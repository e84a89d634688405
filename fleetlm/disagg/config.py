"""``kv_transfer_config``: which side of a disaggregated deployment this engine is, and how K/V
moves. Strict: an unknown key, role or transport is a ``ValueError`` naming it (exit 2 on the
command line), never a silent default.

- ``role``: ``producer`` (runs prefills, stages their K/V for a consumer), ``consumer`` (receives
  K/V and decodes) or ``both``.
- ``transport``: a name in ``fleetlm.disagg.transports.TRANSPORTS`` (``shm``, ``tcp``,
  ``torch_distributed``).
- ``address``: ``host:port`` where a producer serves its staged K/V (control channel, ZMQ).
- ``advertise_address``: the ``host:port`` its handles name, when consumers reach it by another
  name than it binds (``0.0.0.0:5600`` bound, ``prefill-0.prefill:5600`` advertised in Kubernetes).
- ``producers``: the producer addresses a consumer may fetch from. A handle naming any other
  address is refused: a client cannot make a decode worker connect anywhere it likes.
- ``handle_ttl_s``: how long a producer keeps a finished prefill's K/V for its consumer.
- ``max_staged_bytes``: bound on a producer's staged K/V; a prefill past it fails alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

ROLES = ("producer", "consumer", "both")


@dataclass(frozen=True)
class KVTransferConfig:
    role: str
    transport: str = "tcp"
    address: str | None = None
    advertise_address: str | None = None
    producers: tuple[str, ...] = ()
    handle_ttl_s: float = 60.0
    max_staged_bytes: int = 4 << 30
    fetch_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        from fleetlm.disagg.transports import TRANSPORTS

        if self.role not in ROLES:
            raise ValueError(f"kv_transfer_config.role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"kv_transfer_config.transport {self.transport!r} is not known; choose one of: "
                             f"{', '.join(TRANSPORTS)}")
        object.__setattr__(self, "producers", tuple(self.producers))
        for a in tuple(x for x in (self.address, self.advertise_address) if x) + self.producers:
            check_address(a)
        if self.is_producer and self.address is None:
            raise ValueError(f"kv_transfer_config: role {self.role!r} needs an 'address' (host:port) where "
                             "consumers fetch the staged K/V")
        if self.is_consumer and not self.producers and self.role == "consumer":
            raise ValueError("kv_transfer_config: a consumer without a producer: set 'producers' to the "
                             "producer address(es) (host:port) it may fetch K/V from")
        for name in ("handle_ttl_s", "fetch_timeout_s", "max_staged_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"kv_transfer_config.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def is_producer(self) -> bool:
        return self.role in ("producer", "both")

    @property
    def is_consumer(self) -> bool:
        return self.role in ("consumer", "both")

    @property
    def public_address(self) -> str | None:
        """The address a producer's handles name."""
        return self.advertise_address or self.address

    def allowed_producers(self) -> tuple[str, ...]:
        """Addresses this consumer fetches from (``both`` may always fetch from itself)."""
        return self.producers + ((self.public_address,) if self.role == "both" and self.address else ())

    @classmethod
    def parse(cls, value: str | dict | KVTransferConfig) -> KVTransferConfig:
        """From a dict or its JSON text; unknown keys are an error naming them."""
        if isinstance(value, KVTransferConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"kv_transfer_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"kv_transfer_config must be a JSON object, got {type(value).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"kv_transfer_config: unknown key(s) {', '.join(unknown)}; accepted: "
                             f"{', '.join(sorted(names))}")
        if "role" not in value:
            raise ValueError(f"kv_transfer_config needs a 'role': one of {', '.join(ROLES)}")
        if isinstance(value.get("producers"), str):
            value = {**value, "producers": [value["producers"]]}
        return cls(**value)


def check_address(addr: str) -> None:
    host, sep, port = str(addr).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"kv_transfer_config: address {addr!r} is not host:port")
