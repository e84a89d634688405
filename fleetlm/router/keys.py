"""What a policy needs to know about a request, read from its body only when the policy uses it
(round-robin and least-load never parse JSON: the body is forwarded as received)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from fleetlm.router.config import RouterConfig
from fleetlm.router.policies import RouteKey

_EMPTY = RouteKey()


def tenant_of(headers: Mapping[str, str], body: dict | None) -> str | None:
    """The tenant a request belongs to: None without ``--tenants`` (with it, ``Router`` sets
    ``RouteKeyMaker.tenant_of`` to ``tenancy.router_hook.tenant_of_headers(registry)``)."""
    return None


class RouteKeyMaker:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.needs_body = config.policy in ("prefix", "session")
        self.precise = config.policy == "prefix" and config.policy_config.prefix_mode == "precise"
        counts = config.tenants_file is not None and config.model is not None  # tenants' prompt tokens
        self.hasher = PromptHasher(config.model, config.block_size) if self.precise or counts else None
        self.tenant_of = tenant_of
        self.registry = None  # the router's TenantRegistry with --tenants: the tenants' secret salts

    def make(self, path: str, body: bytes, headers: Mapping[str, str], obj: dict | None = None) -> RouteKey:
        """``obj``: the body already parsed (with tenants the proxy parses it first)."""
        if not self.needs_body:
            return _EMPTY
        if obj is None:
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
            salt = obj.get("cache_salt") if isinstance(obj.get("cache_salt"), str) else None
            hashes = self.hasher.hashes(path, obj, self.registry, tenant, salt)
            return RouteKey(block_hashes=hashes, block_size=self.config.block_size, session=session, tenant=tenant)
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

    def num_prompt_tokens(self, path: str, obj: dict) -> int:
        """Every prompt's tokens (a completion may batch several prompts), as a replica counts
        them in ``usage.prompt_tokens``."""
        p = obj.get("prompt")
        if path.endswith("/chat/completions") or not (isinstance(p, list) and p and not isinstance(p[0], int)):
            return len(self.token_ids(path, obj))
        return sum(len(self.token_ids(path, {"prompt": one})) for one in p)

    def hashes(self, path: str, obj: dict, registry=None, tenant: str | None = None,
               cache_salt: str | None = None) -> list[bytes]:
        """The block hashes a replica gives this prompt: salted with the tenant's secret salt
        and the request's ``cache_salt`` (``tenancy.router_hook.salted_block_hashes``, which
        also hashes an opted-in shared prefix under that prefix's own salt), so a tenant's
        blocks match for that tenant only."""
        from fleetlm.tenancy.router_hook import salted_block_hashes

        try:
            ids = self.token_ids(path, obj)
            return salted_block_hashes(registry, tenant, ids, self.block_size, cache_salt)
        except Exception:  # a prompt the replica will refuse (or a tenant a reload removed): route anywhere
            return []
