"""``fleetlm train --config FILE [--set section.key=value ...] [--plot PNG]``, and
``fleetlm train draft-head --method eagle|medusa --target MODEL ...`` (``draft_head_cli.py``).

One process, or every rank of ``torchrun --nproc-per-node N -m fleetlm.entrypoints.cli train``
with the same config (the parallelism section must multiply to N). Bad input (unknown keys, a
mesh that does not match the world, a TP size that does not divide the heads, a checkpoint of
another model) is one line on stderr and exit code 2, before any step runs.
"""

from __future__ import annotations

import argparse
import json


def add_train_command(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune (LoRA) the served model: DDP, FSDP2, TP, PP")
    p.add_argument("--config", help="TOML or YAML file (sections: model, data, parallelism, optimizer, "
                   "schedule, training, precision, checkpoint, logging, lora)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable), e.g. --set optimizer.lr=1e-3")
    p.add_argument("--plot", metavar="PNG", help="write the loss curve here (same as logging.plot)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.set_defaults(func=run)
    from fleetlm.train.draft_head_cli import add_draft_head_command  # fleetlm train draft-head

    add_draft_head_command(p.add_subparsers(dest="train_command", metavar="{draft-head}"))


def run(args: argparse.Namespace) -> int:
    from fleetlm.train.config import load_config

    overrides = list(args.set) + ([f'logging.plot="{args.plot}"'] if args.plot else [])
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(cfg.as_dict(), indent=1))
        return 0
    from fleetlm.train.trainer import train

    result = train(cfg)
    tr = result.trainer
    if tr.layout.is_main and result.metrics:
        last = result.metrics[-1]
        tps = sum(m.tokens for m in result.metrics) / sum(m.seconds for m in result.metrics)
        print(f"step {last.step}: loss {last.loss:.4f}, {tps:,.0f} tokens/s, "
              f"peak memory {last.peak_memory_bytes / 2**20:,.0f} MiB (rank 0)")
    if tr.layout.world > 1:
        from fleetlm.distributed.parallel_state import destroy_distributed

        destroy_distributed(barrier=True)
    return 0
