"""``fleetlm sim``, ``fleetlm profile --hardware`` and ``fleetlm plan --fleet`` from the command
line: results on good input, exit code 2 and a message naming the problem on bad input."""

import json

import pytest

from fleetlm.entrypoints.cli import main

SMALL = ["--num-prompts", "20", "--request-rate", "10", "--random-input-len", "64", "--random-output-len", "8"]


def test_sim_writes_bench_style_results_and_timeline(tmp_path, capsys):
    out, tl = tmp_path / "r.json", tmp_path / "t.csv"
    rc = main(["sim", "--step-time-ms", "10", "--replicas", "2", "--router", "least_load", *SMALL,
               "--save-result", str(out), "--timeline", str(tl), "--goodput", "ttft:100"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Serving Benchmark Result" in text and "replicas simulated: all 2 of 2" in text
    res = json.loads(out.read_text())
    assert res["completed"] == 20 and len(res["ttfts"]) == 20 and "p99_tpot_ms" in res
    assert res["total_output_tokens"] == 160 and "request_goodput" in res
    assert tl.read_text().startswith("t_s,arrivals_per_s,completions_per_s,all_utilisation")


def test_profile_from_the_roofline_then_sim(tmp_path, capsys):
    p = tmp_path / "h100.json"
    assert main(["profile", "--hardware", "h100-sxm", "--model", "llama-3.1-8b", "--out", str(p)]) == 0
    assert json.loads(p.read_text())["source"] == "roofline"
    assert main(["sim", "--profile", str(p), "--model", "llama-3.1-8b", "--replicas", "50", "--sample-replicas", "2",
                 "--users", "30000", "--think-time", "30", "--duration", "2", "--random-input-len", "256",
                 "--random-output-len", "32"]) == 0
    assert "replicas simulated: all 2 of 50 (share of traffic 0.04)" in capsys.readouterr().out


def test_plan_fleet_json(capsys):
    rc = main(["plan", "--fleet", "--model", "llama-3.1-8b", "--hardware", "h100-sxm,h200", "--fleet-tp", "1",
               "--request-rate", "200", "--input-len", "256", "--output-len", "64", "--slo", "ttft:2000", "tpot:60",
               "--sim-duration", "3", "--sim-warmup", "1", "--sample-replicas", "1", "--json"])
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["chosen"].startswith(("h100-sxm TP1", "h200 TP1")) and plan["chosen_fleet"]["meets"]
    assert len(plan["candidates"]) == 2 and plan["evaluations"] >= 2


def _trace(tmp_path, text):
    p = tmp_path / f"trace{len(list(tmp_path.iterdir()))}.csv"
    p.write_text(text)
    return str(p)


def bad_cases(tmp_path):
    prof = tmp_path / "p.json"
    main(["profile", "--hardware", "h100-sxm", "--model", "llama-3.1-8b", "--out", str(prof)])
    fleet = ["plan", "--fleet", "--model", "llama-3.1-8b", "--request-rate", "10"]
    return [
        (["sim", "--step-time-ms", "5", "--trace", _trace(tmp_path, "timestamp,input_len,output_len\n2,5,5\n1,5,5\n")],
         "line 3: timestamp 1.0 is before the previous one"),
        (["sim", "--step-time-ms", "5", "--trace", _trace(tmp_path, "timestamp,input_len,output_len\n-3,5,5\n")],
         "timestamp -3.0 is negative"),
        (["sim", "--profile", str(prof), "--model", "llama-3.1-70b", *SMALL],
         "is for model 'llama-3.1-8b', not 'llama-3.1-70b'"),
        (["sim", "--profile", str(tmp_path / "missing.json"), *SMALL], "cannot read profile"),
        (["sim", *SMALL], "give exactly one replica profile"),
        (["sim", "--step-time-ms", "5", "--goodput", "ttft=5", *SMALL], "--goodput item 'ttft=5'"),
        (["sim", "--step-time-ms", "5", "--replicas", "2", "--prefill-replicas", "2", *SMALL], "P/D split"),
        (fleet + ["--slo", "ttft:soon"], "--slo 'ttft:soon' cannot be parsed"),
        (fleet + ["--slo", "ttft:500", "--routers", ","], "search space is empty"),
        (fleet + ["--slo", "ttft:500", "--fleet-tp", "3"], "search space is empty: no candidate is a valid layout"),
        (fleet + ["--slo", "ttft:500", "--routers", "random"], "unknown policy 'random'"),
        (fleet + ["--slo", "ttft:500", "--pd", "2-1"], "--pd '2-1'"),
        (fleet + ["--slo", "ttft:500", "--hardware", "b200"], "no hourly price for 'b200'"),
        (fleet + ["--slo", "ttft:500", "--concurrency", "5"], "contradictory flags: --concurrency"),
        (["plan", "--fleet", "--model", "llama-3.1-8b", "--slo", "ttft:500"], "exactly one of --users"),
    ]


def test_bad_input_exits_2_naming_it(tmp_path, capsys):
    for argv, words in bad_cases(tmp_path):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err, (argv, err)


@pytest.mark.parametrize("argv", [["sim", "--step-time-ms", "0", *SMALL], ["sim", "--step-time-ms", "5", "--num-prompts", "0"]])
def test_more_bad_numbers(argv, capsys):
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_plot_needs_matplotlib_or_draws(tmp_path, capsys):
    png = tmp_path / "t.png"
    rc = main(["sim", "--step-time-ms", "10", *SMALL, "--plot", str(png)])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert rc == 2 and "needs matplotlib" in capsys.readouterr().err
        return
    assert rc == 0 and png.stat().st_size > 1000
