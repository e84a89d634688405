"""Per-expert routing statistics: counted in the layers, reported by the engine core (through
msgspec like the core process sends them, summed over data-parallel cores), exported as bounded
Prometheus series with the imbalance of the latest window."""

from __future__ import annotations

import msgspec
import pytest

from fleetlm import LLM, SamplingParams
from fleetlm.metrics.stats import SchedulerStats
from fleetlm.moe.report import MoEReport, imbalance
from tests.moe_helpers import make_tiny_moe_dir


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_tiny_moe_dir(tmp_path_factory.mktemp("mixtral_metrics"), "mixtral")


def test_engine_reports_every_routed_assignment(mixtral):
    prompts = [[5, 17, 300, 42], list(range(100, 137))]
    llm = LLM(str(mixtral), dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=6, temperature=0,
                                                                             ignore_eos=True), use_tqdm=False)
    llm.engine.core.executor._moe_report = None  # force a fresh report
    report = llm.engine.core.stats().moe
    forwarded = sum(len(p) + 6 - 1 for p in prompts)  # the last sampled token is never forwarded
    assert report.layers == (0, 1, 2)
    assert [sum(t) for t in report.tokens] == [forwarded * 2] * 3  # top-2
    assert report.dropped == report.rerouted == (0, 0, 0)
    # the core process sends it with msgspec: it must round-trip typed
    stats = SchedulerStats(num_running=1, moe=report)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(stats), type=SchedulerStats) == stats


def test_dense_model_reports_nothing(tmp_path):
    from tests.helpers import make_tiny_hf_dir

    llm = LLM(str(make_tiny_hf_dir(tmp_path / "d")), dtype="float32", kv_cache_memory=16 << 20)
    assert llm.engine.core.stats().moe is None


def test_data_parallel_cores_sum_their_reports():
    from fleetlm.engine.dp_client import merge_stats

    a = MoEReport((0, 2), ((1, 2), (3, 4)), (1, 0), (0, 2))
    b = MoEReport((0, 2), ((10, 20), (30, 40)), (0, 1), (5, 0))
    merged = merge_stats([SchedulerStats(moe=a), SchedulerStats(moe=b), SchedulerStats()])
    assert merged.moe == MoEReport((0, 2), ((11, 22), (33, 44)), (1, 1), (5, 2))


def test_prometheus_series_windowed_imbalance_and_bounded_cardinality():
    from fleetlm.metrics.prometheus import PrometheusMetrics

    m = PrometheusMetrics("tiny")
    m.on_scheduler_stats(SchedulerStats(moe=MoEReport((0, 1), ((4, 4, 4, 4), (8, 0, 0, 0)), (0, 3), (0, 1))))
    m.on_scheduler_stats(SchedulerStats(moe=MoEReport((0, 1), ((10, 4, 4, 6), (8, 2, 2, 4)), (0, 5), (0, 1))))
    text = m.render().decode()
    assert 'fleetlm:moe_expert_tokens_total{expert="0",layer="0",model_name="tiny"} 10.0' in text
    assert 'fleetlm:moe_layer_tokens_total{layer="1",model_name="tiny"} 16.0' in text
    assert 'fleetlm:moe_tokens_dropped_total{layer="1",model_name="tiny"} 5.0' in text
    assert 'fleetlm:moe_tokens_rerouted_total{layer="1",model_name="tiny"} 1.0' in text
    # window 2, layer 0: (6, 0, 0, 2) -> max 6 / mean 2 = 3.0; hottest expert 0
    assert 'fleetlm:moe_layer_imbalance{layer="0",model_name="tiny"} 3.0' in text
    assert 'fleetlm:moe_layer_hottest_expert{layer="0",model_name="tiny"} 0.0' in text
    assert imbalance((2, 2, 2, 2)) == 1.0 and imbalance((0, 0)) == 0.0
    rep = PrometheusMetrics("rep")  # EP rank loads: (30, 10) since the last report -> 1.5; 2 replicas
    rep.on_scheduler_stats(SchedulerStats(moe=MoEReport((0,), ((4, 4),), (0,), (0,), ((1,),), ((10, 10),))))
    rep.on_scheduler_stats(SchedulerStats(moe=MoEReport((0,), ((8, 8),), (0,), (0,), ((0, 1),), ((40, 20),))))
    text = rep.render().decode()
    assert 'fleetlm:moe_layer_rank_imbalance{layer="0",model_name="rep"} 1.5' in text
    assert 'fleetlm:moe_layer_replicas{layer="0",model_name="rep"} 2.0' in text
    big = PrometheusMetrics("big")  # 48 layers x 64 experts > 1024 series: per-layer only
    big.on_scheduler_stats(SchedulerStats(moe=MoEReport(tuple(range(48)), ((1,) * 64,) * 48, (0,) * 48, (0,) * 48)))
    text = big.render().decode()
    assert "moe_expert_tokens_total{" not in text and 'moe_layer_tokens_total{layer="47"' in text


def test_bench_moe_writes_heatmap_and_counts(mixtral, tmp_path, capsys):
    import json

    from fleetlm.entrypoints.cli import main

    png, res = tmp_path / "heat.png", tmp_path / "r.json"
    assert main(["bench", "moe", "--model", str(mixtral), "--dtype", "float32", "--kv-cache-memory", "16MiB",
                 "--num-prompts", "3", "--input-len", "5", "--output-len", "4", "--heatmap", str(png),
                 "--save-result", str(res)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    r = json.loads(res.read_text())
    assert [sum(t) for t in r["tokens"]] == [3 * (5 + 4 - 1) * 2] * 3  # this run's assignments only
    assert r["max_imbalance"] >= 1.0 and r["dropped"] == r["rerouted"] == 0
    assert main(["bench", "moe", "--model", str(mixtral), "--num-prompts", "0"]) == 2
    assert "--num-prompts must be >= 1, got 0" in capsys.readouterr().err
