"""Per-expert metrics through the server: a tiny Mixtral served with a tight capacity and the
drop policy answers a completion, and /metrics shows per-expert and per-layer series (bounded
labels), the imbalance gauge and the dropped assignments."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.moe_helpers import make_tiny_moe_dir
from tests.server_utils import ServerProcess

pytestmark = pytest.mark.slow


def test_metrics_show_experts_and_capacity_drops(tmp_path):
    path = make_tiny_moe_dir(tmp_path / "mixtral", "mixtral")
    args = ["--dtype", "float32", "--kv-cache-memory", "32MiB", "--moe-capacity-factor", "0.5",
            "--moe-overflow-policy", "drop"]
    with ServerProcess(args, model=path) as srv:
        for prompt in ("Hello there, how are the experts doing today?", "Another prompt"):
            r = httpx.post(srv.url + "/v1/completions", json={"model": str(path), "prompt": prompt,
                                                              "max_tokens": 4, "temperature": 0}, timeout=60)
            assert r.status_code == 200, r.text
            time.sleep(1.2)  # the core refreshes its MoE report at most once a second
        text = httpx.get(srv.url + "/metrics", timeout=30).text
    experts = re.findall(r'^fleetlm:moe_expert_tokens_total\{expert="(\d+)",layer="(\d+)"', text, re.M)
    assert experts and {int(layer) for _, layer in experts} <= {0, 1, 2} and {int(e) for e, _ in experts} <= set(range(8))
    assert srv_metric(text, "fleetlm:moe_layer_tokens_total") > 0
    assert srv_metric(text, "fleetlm:moe_tokens_dropped_total") > 0  # capacity 0.5 x T x 2 / 8 per expert
    assert srv_metric(text, "fleetlm:moe_tokens_rerouted_total") == 0
    assert re.search(r'^fleetlm:moe_layer_imbalance\{layer="0"', text, re.M)


def srv_metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))
