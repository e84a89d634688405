"""LoRA fine-tune of SmolLM2-135M-Instruct on a small task: memorising 16 made-up facts
("The secret code of Alice is 4721."), each seen 8 times in shuffled orders (packed into
sequences of 32 tokens: 54 sequences, about 4.7 passes in 64 steps). Task metric: the share
of facts whose code the model produces greedily after "The secret code of NAME is" (teacher-forced argmax over the code's
tokens, which equals greedy decoding when every token matches), and the mean loss on those
tokens; before (the adapter's B starts at zero: the base model) and after training.
Fixed seed and workload; one process. Not a timing run (no speed is recorded), so it runs at
low priority outside the benchmark lock:

    nice -n 19 python benchmarks/train_lora_smollm2.py
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import torch

NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena",
         "Mateo", "Nia", "Omar", "Priya"]


def facts(seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"The secret code of {n} is", f" {rng.randint(1000, 9999)}.") for n in NAMES]


def evaluate(lm, tok, items: list[tuple[str, str]]) -> tuple[float, float]:
    """(exact-match share, mean loss over the answer tokens)."""
    from fleetlm.train.loss import head_logits

    hits, losses = 0, []
    lm.eval()
    with torch.no_grad():
        for prompt, answer in items:
            p, a = tok.encode(prompt, add_special_tokens=False), tok.encode(answer, add_special_tokens=False)
            ids = torch.tensor([p + a])
            logits = head_logits(lm.lm_head, lm(ids))[0, len(p) - 1 : -1].float()
            target = torch.tensor(a)
            hits += bool((logits.argmax(-1) == target).all())
            losses.append(float(torch.nn.functional.cross_entropy(logits, target)))
    lm.train()
    return hits / len(items), sum(losses) / len(losses)


def main(steps: int = 64) -> dict:
    from fleetlm.train.config import load_config
    from fleetlm.train.trainer import Trainer

    items = facts()
    tmp = Path(tempfile.mkdtemp())
    rng = random.Random(1)  # the facts in 8 shuffled orders: the name, not the neighbours, cues the code
    docs = [p + a for _ in range(8) for p, a in rng.sample(items, len(items))]
    (tmp / "facts.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = load_config(None, [
        'model.path="smollm2-135m-instruct"', f'data.paths=["{tmp / "facts.jsonl"}"]', 'data.format="jsonl"',
        "data.seq_len=32", f"training.steps={steps}", "training.micro_batch=4", "optimizer.lr=3e-3",
        "optimizer.weight_decay=0.0", "schedule.warmup_steps=2", "logging.progress=false", "lora.r=8",
        "lora.alpha=16", 'lora.target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]',
        f'lora.save_dir="{tmp / "adapter"}"'])
    tr = Trainer(cfg)
    before = evaluate(tr.root.lm, tr.tm.tokenizer, items)
    rows = tr.run().metrics
    after = evaluate(tr.root.lm, tr.tm.tokenizer, items)
    trainable = sum(p.numel() for _, p in tr.named)
    total = sum(p.numel() for p in tr.root.parameters())
    return {"steps": steps, "windows": tr.dataset.windows, "trainable_params": trainable, "total_params": total,
            "exact_match_before": before[0], "exact_match_after": after[0], "answer_loss_before": before[1],
            "answer_loss_after": after[1], "train_loss_first": rows[0].loss, "train_loss_last": rows[-1].loss,
            "train_losses": [m.loss for m in rows]}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/train_lora_smollm2.json")
    args = ap.parse_args()
    out = main(args.steps)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
