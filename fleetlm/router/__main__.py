"""``python -m fleetlm.router ...``: the router without the rest of the CLI (imports stay light)."""

import argparse
import sys

from fleetlm.router.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fleetlm.router", description="fleetlm router")
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except ValueError as e:
        print(f"fleetlm router: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
