"""``python -m fleetlm.plan ...``: the same as ``fleetlm plan ...``."""

import sys

from fleetlm.plan.cli import main

sys.exit(main())
