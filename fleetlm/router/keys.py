"""What a policy needs to know about a request, read from its body only when the policy uses it
(round-robin and least-load never parse JSON: the body is forwarded as received)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from fleetlm.router.config import RouterConfig
from fleetlm.router.policies import RouteKey

_EMPTY = RouteKey()


def tenant_of(headers: Mapping[str, str], body: dict | None) -> str | None:
    """Hook for tenant-aware routing: the tenant a request belongs to (None until tenancy
    exists; a tenancy layer replaces this function or sets ``RouteKeyMaker.tenant_of``)."""
    return None


class RouteKeyMaker:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.needs_body = config.policy in ("prefix", "session")
        self.precise = config.policy == "prefix" and config.policy_config.prefix_mode == "precise"
        self.hasher = PromptHasher(config.model, config.block_size) if self.precise else None
        self.tenant_of = tenant_of

    def make(self, path: str, body: bytes, headers: Mapping[str, str]) -> RouteKey:
        if not self.needs_body:
            return _EMPTY
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _EMPTY  # the replica answers the 400
        if not isinstance(obj, dict):
            return _EMPTY
        session = headers.get(self.config.session_header) or (obj.get("user") if isinstance(obj.get("user"), str)
                                                               else None)
        tenant = self.tenant_of(headers, obj)
        if self.config.policy == "session":
            return RouteKey(session=session, tenant=tenant)
        if self.precise:
            return RouteKey(block_hashes=self.hasher.hashes(path, obj), block_size=self.config.block_size,
                            session=session, tenant=tenant)
        return RouteKey(prefix=prompt_text(path, obj), session=session, tenant=tenant)


def prompt_text(path: str, obj: dict) -> str | None:
    """The prompt as text for the approximate tree: a completion's prompt (the first of a batch;
    token ids as their decimal text), or a chat's messages as role and content lines."""
    if path.endswith("/chat/completions"):
        msgs = obj.get("messages")
        if not isinstance(msgs, list):
            return None
        return "".join(f"{m.get('role')}\x1f{_content(m.get('content'))}\x1e" for m in msgs if isinstance(m, dict))
    p = obj.get("prompt")
    if isinstance(p, list) and p and not isinstance(p[0], int):
        p = p[0]
    if isinstance(p, list):
        return " ".join(str(t) for t in p)
    return p if isinstance(p, str) else None


def _content(c) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        return "".join(part.get("text", "") for part in c if isinstance(part, dict))
    return ""


class PromptHasher:
    """The replicas' stable block hashes of a prompt: the same tokenizer and chat template, the
    same chain hash (``core/block_pool.hash_block``), full blocks only."""

    def __init__(self, model: str, block_size: int) -> None:
        from fleetlm.config import EngineArgs
        from fleetlm.engine.processor import load_engine_parts

        files, _, _ = load_engine_parts(EngineArgs(model=model, device="cpu"))
        self.tok = files.tokenizer
        self.block_size = block_size

    def token_ids(self, path: str, obj: dict) -> list[int]:
        if path.endswith("/chat/completions"):
            msgs = [m for m in obj.get("messages") or [] if isinstance(m, dict)]
            text = self.tok.apply_chat_template(msgs, True)
            return self.tok.encode(text, add_special_tokens=False)
        p = obj.get("prompt")
        if isinstance(p, list) and p and not isinstance(p[0], int):
            p = p[0]
        if isinstance(p, list):
            return [int(t) for t in p]
        return self.tok.encode(p, add_special_tokens=True) if isinstance(p, str) else []

    def hashes(self, path: str, obj: dict) -> list[bytes]:
        """Unsalted hashes: a tenant's salted blocks (issue 15) need the tenant's salt here, which
        a tenant-aware policy passes through ``core.block_pool.prompt_block_hashes``."""
        from fleetlm.core.block_pool import prompt_block_hashes

        try:
            ids = self.token_ids(path, obj)
        except Exception:  # a prompt the replica will refuse: route it anywhere, it gets its 400 there
            return []
        return prompt_block_hashes(ids, self.block_size)
