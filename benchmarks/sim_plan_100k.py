"""The 100,000-user plan: `fleetlm plan --fleet` for a chat workload on H100 and H200.

100,000 concurrent users, each sending a request every 33.3 s on average (3,000 requests/s,
Poisson); prompts 1024 +- 50% tokens, answers 256 +- 50% tokens; Llama-3.1-70B in bf16.
SLOs: TTFT p90 <= 2 s, TPOT p90 <= 50 ms. Searched, once for H100-SXM and once for H200 (so
each GPU type gets its own best fleet; the plan is the cheaper of the two): TP 2/4/8, no P/D
or P/D (prefill:decode) 1:1 / 2:1 / 3:1, round-robin or least-load routing, max_num_seqs 128
or 256. Each trial simulates 2 replicas per pool for 10 s of warm-up + 30 s measured + a 7.5 s
cool-down.

    python benchmarks/sim_plan_100k.py --out benchmarks/sim_plan_100k.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = ["plan", "--fleet", "--model", "llama-3.1-70b", "--users", "100000",
        "--think-time", "33.3", "--input-len", "1024", "--output-len", "256", "--range-ratio", "0.5",
        "--slo", "ttft:2000", "tpot:50", "--fleet-tp", "2,4,8", "--pd", "none,1:1,2:1,3:1",
        "--routers", "round_robin,least_load", "--batch-sizes", "128,256", "--sim-duration", "30",
        "--sim-warmup", "10", "--sample-replicas", "2", "--top", "12"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/sim_plan_100k.json")
    args = p.parse_args()
    doc: dict = {"load_before": os.getloadavg()[0], "runs": {}}
    for hw in ("h100-sxm", "h200"):
        argv = [*ARGS, "--hardware", hw]
        out = Path(tempfile.gettempdir()) / f"sim_plan_100k_{hw}.json"
        print("$ fleetlm " + shlex.join(argv), flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", *argv, "--save-result", str(out)], check=True)
        doc["runs"][hw] = json.loads(out.read_text()) | {"command": "fleetlm " + shlex.join(argv),
                                                         "wall_s": time.perf_counter() - t0}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
