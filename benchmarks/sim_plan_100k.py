"""The 100,000-user plan: `fleetlm plan --fleet` for a chat workload on H100 and H200.

100,000 concurrent users, each sending a request every 33.3 s on average (3,000 requests/s,
Poisson); prompts 1024 +- 50% tokens, answers 256 +- 50% tokens; Llama-3.1-70B in bf16.
SLOs: TTFT p90 <= 2 s, TPOT p90 <= 50 ms. Searched: H100-SXM and H200, TP 2/4/8, no P/D or
P/D 1:1 / 1:2 / 1:3, round-robin or least-load routing, max_num_seqs 128 or 256. Each trial
simulates 2 replicas per pool for 10 s of warm-up + 30 s measured + a 7.5 s cool-down.

    python benchmarks/sim_plan_100k.py --out benchmarks/sim_plan_100k.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ARGS = ["plan", "--fleet", "--model", "llama-3.1-70b", "--hardware", "h100-sxm,h200", "--users", "100000",
        "--think-time", "33.3", "--input-len", "1024", "--output-len", "256", "--range-ratio", "0.5",
        "--slo", "ttft:2000", "tpot:50", "--fleet-tp", "2,4,8", "--pd", "none,1:1,1:2,1:3",
        "--routers", "round_robin,least_load", "--batch-sizes", "128,256", "--sim-duration", "30",
        "--sim-warmup", "10", "--sample-replicas", "2", "--top", "12"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/sim_plan_100k.json")
    args = p.parse_args()
    cmd = [sys.executable, "-m", "fleetlm.entrypoints.cli", *ARGS]
    print("$ fleetlm " + shlex.join(ARGS), flush=True)
    t0 = time.perf_counter()
    text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    js = subprocess.run(cmd + ["--json"], capture_output=True, text=True).stdout if "--json" not in ARGS else text
    print(text)
    doc = {"command": "fleetlm " + shlex.join(ARGS), "report": text, "wall_s": time.perf_counter() - t0}
    try:
        doc["plan"] = json.loads(js)
    except json.JSONDecodeError:
        pass
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
