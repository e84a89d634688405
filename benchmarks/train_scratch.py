"""A tiny Llama trained from scratch on the Python standard library's source: loss curve
(PNG) and final loss. Fixed seed and workload; one process.

    flock /tmp/fleetlm-bench.lock python benchmarks/train_scratch.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CONFIG = """
[model]
size = "tiny"
seed = 0
[data]
paths = ["stdlib"]
max_tokens = 2000000
seq_len = 128
seed = 0
[training]
steps = 400
micro_batch = 16
max_grad_norm = 1.0
[optimizer]
lr = 3e-3
weight_decay = 0.1
[schedule]
warmup_steps = 20
min_lr_ratio = 0.1
[logging]
progress = false
jsonl = "benchmarks/train_scratch.jsonl"
plot = "benchmarks/train_scratch.png"
"""


def main() -> None:
    import tomllib

    from fleetlm.train.config import TrainConfig
    from fleetlm.train.trainer import train

    Path("benchmarks/train_scratch.jsonl").unlink(missing_ok=True)
    cfg = TrainConfig.from_dict(tomllib.loads(CONFIG))
    load = os.getloadavg()
    r = train(cfg)
    rows = r.metrics
    tail = [m.loss for m in rows[-20:]]
    out = {"config": CONFIG, "steps": len(rows), "first_loss": rows[0].loss, "final_loss": rows[-1].loss,
           "final_loss_mean_last_20": sum(tail) / len(tail), "tokens": sum(m.tokens for m in rows),
           "windows_in_corpus": r.trainer.dataset.windows, "epochs": len(rows) * 16 / r.trainer.dataset.windows,
           "tokens_per_s": sum(m.tokens for m in rows) / sum(m.seconds for m in rows),
           "load_before": load, "load_after": os.getloadavg()}
    Path("benchmarks/train_scratch.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "config"}, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
