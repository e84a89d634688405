"""``fleetlm plan --disagg``: prefill/decode worker counts from SLOs, KV transfer estimates."""

from __future__ import annotations

import json
import math

import pytest

from fleetlm.plan.cli import main
from fleetlm.plan.errors import PlanError
from fleetlm.plan.hardware import get_hardware
from fleetlm.plan.model_load import load_model_spec
from fleetlm.plan.pd import _wait, kv_link, plan_pd
from fleetlm.plan.report import resolve_format
from fleetlm.plan.roofline import Machine, step_cost
from fleetlm.plan.workload import Layout

H100 = get_hardware("h100-sxm")
CPU = get_hardware("cpu", mem_bandwidth=20e9, peak_flops=1e12)
LLAMA = load_model_spec("llama-3.1-8b")


def test_kv_links_follow_the_transport_and_the_hardware():
    assert kv_link("tcp", CPU).bandwidth == 20e9 / 2 / 2  # loopback: two kernel copies
    assert kv_link("shm", CPU).bandwidth == 20e9 / 2  # one copy out of the segment
    assert kv_link("tcp", H100).bandwidth == H100.network_bw
    assert kv_link("nccl", H100).bandwidth == H100.interconnect_bw
    assert kv_link("tcp", H100, bandwidth=1e9, latency_s=0.01).bandwidth == 1e9
    with pytest.raises(PlanError, match="accepted values: tcp, shm"):
        kv_link("rdma", H100)
    with pytest.raises(PlanError, match="between GPUs"):
        kv_link("nccl", CPU)


def _plan(rate=20.0, ttft=0.5, tpot=0.03, inp=2048, out=256, link=None, tp=1):
    return plan_pd(LLAMA, H100, resolve_format(LLAMA, "bf16"), rate=rate, input_len=inp, output_len=out,
                   ttft_slo_s=ttft, tpot_slo_s=tpot, link=link or kv_link("tcp", H100), tp=tp)


@pytest.mark.parametrize("rate", [5.0, 20.0, 80.0, 300.0])
def test_worker_counts_are_the_smallest_that_meet_the_slos(rate):
    p = _plan(rate=rate)
    mc = Machine(LLAMA, resolve_format(LLAMA, "bf16"), "bf16", H100, Layout())
    s = step_cost(mc, "prefill", 1, 2048, 2048).time_s
    assert p.prefill_s == s
    assert p.transfer_s == pytest.approx(50e-6 + 2048 * 131072 / H100.network_bw)  # 128 KiB/token, 8B bf16
    assert p.ttft_s <= 0.5 and p.tpot_s <= 0.03
    first = p.ttft_s - p.queue_wait_s - s - p.transfer_s
    fewer = p.prefill_workers - 1
    assert fewer == 0 or _wait(rate * s / fewer, s) + s + p.transfer_s + first > 0.5
    # Little's law: the sequences decoding at once, spread over the decode workers
    assert p.decode_batch * p.decode_workers == pytest.approx(rate * 255 * p.tpot_s, rel=1e-6)
    if p.decode_workers > 1:  # one fewer worker: its settled batch breaks memory or the TPOT SLO
        b, t = 0.0, 0.03
        for _ in range(200):
            b = rate * 255 * t / (p.decode_workers - 1)
            t = step_cost(mc, "decode", math.ceil(b), 1, 2048 + 128).time_s
            if b > p.max_decode_batch:
                break
        assert b > p.max_decode_batch or t > 0.03


def test_more_traffic_never_needs_fewer_workers_and_a_slow_link_shows_in_ttft():
    plans = [_plan(rate=r) for r in (10.0, 40.0, 160.0)]
    assert [p.prefill_workers for p in plans] == sorted(p.prefill_workers for p in plans)
    assert [p.decode_workers for p in plans] == sorted(p.decode_workers for p in plans)
    assert plans[-1].prefill_workers > plans[0].prefill_workers
    slow = _plan(link=kv_link("tcp", H100, bandwidth=1e9))
    assert slow.transfer_s == pytest.approx(50e-6 + 2048 * 131072 / 1e9)
    assert slow.ttft_s - slow.transfer_s == pytest.approx(_plan().ttft_s - _plan().transfer_s, rel=0.05)


def test_impossible_slos_are_refused_naming_the_step_that_breaks_them():
    with pytest.raises(PlanError, match="below one prefill"):
        _plan(ttft=0.01)
    with pytest.raises(PlanError, match="below one decode step at batch 1"):
        _plan(tpot=0.001)


def test_cli_prints_the_plan_and_its_json(capsys):
    argv = ["--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--disagg", "--request-rate", "40",
            "--slo", "ttft:500", "tpot:30", "--input-len", "2048", "--output-len", "256"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "prefill workers:" in text and "decode workers:" in text and "over tcp" in text
    assert main(argv + ["--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = _plan(rate=40.0)
    assert (got["prefill_workers"], got["decode_workers"]) == (want.prefill_workers, want.decode_workers)


@pytest.mark.parametrize("extra, message", [
    ([], "needs --slo ttft:MS tpot:MS"),
    (["--slo", "ttft:500"], "exactly --slo ttft:MS tpot:MS"),
    (["--slo", "p99_ttft:500", "tpot:30"], "percentile SLOs need --fleet"),
    (["--slo", "ttft:500", "tpot:30", "--kv-transport", "carrier-pigeon"], "accepted values"),
    (["--slo", "ttft:500", "tpot:30", "--kv-bandwidth", "0"], "--kv-bandwidth must be > 0"),
    (["--slo", "ttft:500", "tpot:30", "--concurrency", "8"], "contradictory flags: --concurrency"),
])
def test_cli_bad_input_exits_2_naming_it(capsys, extra, message):
    argv = ["--model", "llama-3.1-8b", "--disagg", "--request-rate", "10", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_probed_cpu_host_sends_tcp_at_its_loopback_rate_plus_one_copy():
    import dataclasses

    probed = dataclasses.replace(CPU, network_bw=2e9, page_fault_bw=4e9)  # what `--probe` puts there
    link = kv_link("tcp", probed)
    assert link.bandwidth == pytest.approx(1 / (1 / 2e9 + 1 / 4e9 + 1 / 10e9)) and "probed" in link.how
    assert kv_link("shm", probed).bandwidth == pytest.approx(1 / (1 / 4e9 + 1 / 10e9))  # no socket


def test_the_probe_measures_loopback_tcp():
    from fleetlm.plan.probe import tcp_loopback_bandwidth

    bw = tcp_loopback_bandwidth(8 << 20, reps=2)
    assert 1e7 < bw < 1e12
