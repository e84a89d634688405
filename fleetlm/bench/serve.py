"""``fleetlm bench serve``: placeholder until the load-test client lands."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")


def main(args: argparse.Namespace) -> int:
    raise ValueError("bench serve is not implemented yet")
