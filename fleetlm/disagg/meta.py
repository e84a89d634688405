"""What travels with the K/V: the engine's fingerprint (checked at the handshake) and one
transfer's metadata. Plain msgspec structs, encoded as msgpack on the control channel.

Staged layout (``LAYOUT``): one contiguous tensor ``[blocks, layers, 2 (K, V), block_size,
kv_heads, head_dim]``, block-major so that any run of blocks (the ones a consumer lacks) is one
contiguous byte range. ``kv_heads`` are all of the model's KV heads: a producer with tensor
parallelism merges its ranks' heads, a consumer splits them for its own ranks (``layout.py``).
"""

from __future__ import annotations

import msgspec

LAYOUT = "block,layer,kv,slot,kv_head,head_dim"


class EngineFingerprint(msgspec.Struct, frozen=True):
    """Everything that must agree between producer and consumer for K/V to mean the same."""

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    weights_digest: str  # sha256 of a few weight rows: the same checkpoint, not only the same shape
    layout: str = LAYOUT

    def mismatch(self, other: EngineFingerprint) -> str | None:
        """A sentence naming the first field that differs, or None."""
        names = {"weights_digest": "model (weights)", "architecture": "model architecture"}
        for f in self.__struct_fields__:
            a, b = getattr(self, f), getattr(other, f)
            if a != b:
                return (f"producer and consumer disagree on {names.get(f, f).replace('_', ' ')}: "
                        f"producer {b!r}, consumer {a!r}")
        return None


class TransferMeta(msgspec.Struct, frozen=True):
    """One staged prefill: the K/V of ``token_ids`` (the prompt) in ``num_blocks`` blocks."""

    transfer_id: str
    engine: EngineFingerprint
    token_ids: list[int]
    first_token_id: int  # the token the producer sampled: the consumer decodes after it
    block_hashes: list[bytes]  # stable digests of the full blocks (core/block_pool.py: hash_block)
    num_blocks: int
    bytes_per_block: int
    expires_at: float  # wall-clock time (time.time()) after which the producer drops it


class Hello(msgspec.Struct, tag="hello", array_like=True):
    pass


class Lookup(msgspec.Struct, tag="lookup", array_like=True):
    transfer_id: str


class Fetch(msgspec.Struct, tag="fetch", array_like=True):
    transfer_id: str
    first_block: int  # blocks before this one the consumer already holds (prefix cache)
    peer: str = ""  # the consumer's transport endpoint (torch_distributed: its group id)


class Release(msgspec.Struct, tag="release", array_like=True):
    transfer_id: str


class Join(msgspec.Struct, tag="join", array_like=True):
    """torch_distributed: open a two-rank gloo group with this consumer."""

    peer: str


Request = Hello | Lookup | Fetch | Release | Join


class Reply(msgspec.Struct, array_like=True):
    ok: bool
    error: str = ""
    engine: EngineFingerprint | None = None
    meta: TransferMeta | None = None
    info: dict = {}  # transport-specific: shm segment and offsets, gloo tag, store port


class UnknownHandle(LookupError):
    """The producer holds no K/V under this transfer id (never staged, expired or released)."""


class HandshakeError(ValueError):
    """Producer and consumer cannot exchange K/V (different model, block size, dtype or layout)."""
