"""Speculative-decoding figures for ``fleetlm bench serve``: the server's ``spec_decode_*``
counters (``fleetlm:`` or ``vllm:`` prefix, the same meanings) read from ``/metrics`` before and
after the run; their difference gives the run's acceptance rate (accepted / draft tokens) and
mean acceptance length (1 + accepted / drafts: tokens per verification)."""

from __future__ import annotations

import re
from typing import Any

_LINE = re.compile(r'^(?:fleetlm|vllm):spec_decode_(num_drafts|num_draft_tokens|num_accepted_tokens|'
                   r'num_accepted_tokens_per_pos)_total\{([^}]*)\}\s+([0-9.eE+-]+)\s*$')
_POS = re.compile(r'position="(\d+)"')


def parse_spec_counters(text: str) -> dict[str, Any] | None:
    """The spec counters in a Prometheus text page, or None when the server has none."""
    out: dict[str, Any] = {"num_drafts": 0.0, "num_draft_tokens": 0.0, "num_accepted_tokens": 0.0, "per_pos": {}}
    found = False
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        found = True
        name, labels, value = m.group(1), m.group(2), float(m.group(3))
        if name == "num_accepted_tokens_per_pos":
            pos = _POS.search(labels)
            if pos:
                out["per_pos"][int(pos.group(1))] = out["per_pos"].get(int(pos.group(1)), 0.0) + value
        else:
            out[name] += value
    return out if found else None


def spec_metrics(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    if after is None:
        return None
    before = before or {"num_drafts": 0.0, "num_draft_tokens": 0.0, "num_accepted_tokens": 0.0, "per_pos": {}}
    d = {k: after[k] - before[k] for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    per_pos = [after["per_pos"].get(j, 0.0) - before["per_pos"].get(j, 0.0) for j in sorted(after["per_pos"])]
    return {
        "spec_num_drafts": int(d["num_drafts"]),
        "spec_num_draft_tokens": int(d["num_draft_tokens"]),
        "spec_num_accepted_tokens": int(d["num_accepted_tokens"]),
        "spec_acceptance_rate": d["num_accepted_tokens"] / d["num_draft_tokens"] if d["num_draft_tokens"] else 0.0,
        "spec_mean_acceptance_length": 1.0 + d["num_accepted_tokens"] / d["num_drafts"] if d["num_drafts"] else 0.0,
        "spec_acceptance_per_pos": [n / d["num_drafts"] if d["num_drafts"] else 0.0 for n in per_pos],
    }


async def fetch_spec_counters(session: Any, base_url: str, headers: dict[str, str]) -> dict[str, Any] | None:
    """None when /metrics is missing, refused or has no spec counters."""
    try:
        async with session.get(base_url + "/metrics", headers=headers) as resp:
            if resp.status != 200:
                return None
            return parse_spec_counters(await resp.text())
    except Exception:  # noqa: BLE001 - a server without /metrics just has no figures here
        return None


def format_spec(m: dict[str, Any]) -> list[str]:
    lines = ["{:-^50}".format("Speculative Decoding")]
    for label, key in (("Acceptance rate (%):", None), ("Acceptance length:", "spec_mean_acceptance_length"),
                       ("Drafts:", "spec_num_drafts"), ("Draft tokens:", "spec_num_draft_tokens"),
                       ("Accepted tokens:", "spec_num_accepted_tokens")):
        value = 100 * m["spec_acceptance_rate"] if key is None else m[key]
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<40} {text}")
    for j, rate in enumerate(m["spec_acceptance_per_pos"]):
        lines.append(f"{f'Acceptance at position {j}:':<40} {rate:.2f}")
    return lines
