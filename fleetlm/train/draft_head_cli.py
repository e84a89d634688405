"""``fleetlm train draft-head --method eagle|medusa --target MODEL [--data chat stdlib FILE ...] --out DIR``.

Every flag maps to a field of ``DraftHeadConfig`` (its defaults are the flags' defaults). Bad
input (unknown method, missing data file, a ``--init-from`` head of another target) is one line on
stderr and exit code 2, before the target generates anything.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from fleetlm.models.hub import DEFAULT_MODEL

_FLAGS: dict[str, tuple[type, str]] = {
    "num_prompts": (int, "prompts the target answers"),
    "max_new_tokens": (int, "tokens per answer"),
    "temperature": (float, "0: greedy answers; > 0: sampled (seeded per prompt)"),
    "dtype": (str, "the target's dtype for answers and features (the serving dtype): bfloat16 or float32"),
    "steps": (int, "optimizer steps"),
    "batch_size": (int, "sequences per step"),
    "lr": (float, "AdamW peak learning rate (warmup, then cosine to 10%%)"),
    "warmup_steps": (int, "linear warmup steps"),
    "weight_decay": (float, "AdamW weight decay"),
    "max_grad_norm": (float, "gradient clipping"),
    "num_heads": (int, "medusa: heads K (head j predicts the token j + 2 ahead)"),
    "num_layers": (int, "medusa: residual blocks per head"),
    "ce_weight": (float, "eagle: weight of the token cross-entropy next to the feature regression"),
    "feature_noise": (float, "eagle: uniform noise on input features, times their std"),
    "teacher_topk": (int, "the target's top-K per position kept as the distillation target; training logits "
                     "cover the union of these tokens"),
    "eval_fraction": (float, "samples held out for the final evaluation"),
    "seed": (int, "seeds prompts, sampling, initialisation and batch order"),
    "max_num_seqs": (int, "concurrent requests while the target answers"),
    "log_every": (int, "print metrics every N steps"),
}


def add_draft_head_command(sub) -> None:
    from fleetlm.train.draft_head import DraftHeadConfig

    defaults = {f.name: f.default for f in fields(DraftHeadConfig)}
    p = sub.add_parser("draft-head", help="train an EAGLE or Medusa draft head by self-distillation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=["eagle", "medusa"])
    p.add_argument("--target", default=DEFAULT_MODEL, help="the target model (alias, GGUF file or HF directory)")
    p.add_argument("--out", required=True, help="directory for config.json + model.safetensors")
    p.add_argument("--data", nargs="+", default=list(defaults["data"]),
                   help="prompt sources: chat (bundled), stdlib (explain-this-code over the standard library), "
                        ".txt (one prompt a line) or .jsonl ({\"prompt\": ...}) files")
    p.add_argument("--init-from", help="continue from this head (same method and target)")
    p.add_argument("--corpus-cache", help="a .pt file for the target's answers and features: written on the first "
                   "run, reused by later ones with the same data settings (e.g. an EAGLE and a Medusa run)")
    p.add_argument("--exclude-prompts", help="a .txt file of prompts never to train on (held-out benchmark prompts)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    for name, (typ, help_) in _FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=defaults[name],
                       help=f"{help_} (default {defaults[name]})")
    p.set_defaults(func=run_draft_head)


def run_draft_head(args: argparse.Namespace) -> int:
    from fleetlm.train import draft_head_data as data
    from fleetlm.train.draft_head import DraftHeadConfig, config_json, train_draft_head

    cfg = DraftHeadConfig(method=args.method, target=args.target, out=args.out, data=tuple(args.data),
                          init_from=args.init_from, corpus_cache=args.corpus_cache,
                          exclude_prompts=tuple(data.file_prompts(Path(args.exclude_prompts))) if args.exclude_prompts else (),
                          **{k: getattr(args, k) for k in _FLAGS})
    result = train_draft_head(cfg, progress=not args.quiet)
    print(config_json(result))
    return 0
