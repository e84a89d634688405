"""``fleetlm train draft-head``: EAGLE or Medusa heads for a target, by self-distillation.

Python API::

    from fleetlm.train.draft_head import DraftHeadConfig, train_draft_head
    result = train_draft_head(DraftHeadConfig(method="medusa", target="smollm2-135m-instruct", out="heads/m"))
    LLM(speculative_config={"method": "medusa", "model": "heads/m", "num_speculative_tokens": 3})

Steps: check the whole configuration (method, data sources, a head to start from: its format and
its target) before any work; the target answers the prompts (``draft_head_data``); its features
are computed once; the head trains for ``steps`` AdamW steps (warmup, then cosine to 10%); the
head is written in the proposers' format (docs/SPEC_DECODE.md) with the target's name and
signature, so a proposer refuses it on another model. Losses: ``draft_head_model``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fleetlm.spec_decode.heads import (
    EAGLE_FORMAT,
    MEDUSA_FORMAT,
    check_target,
    read_head,
    target_signature,
    write_head,
)
from fleetlm.train import draft_head_data as data
from fleetlm.train import draft_head_model as hm

METHODS = {"eagle": EAGLE_FORMAT, "medusa": MEDUSA_FORMAT}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DraftHeadConfig:
    """``data``: ``chat``, ``stdlib`` or .txt/.jsonl prompt files; ``dtype``: the target's dtype for
    generation and features (the engine's serving dtype, so features match what the proposer
    sees); ``init_from``: a head directory of the same method and target to continue from."""

    method: str
    target: str
    out: str
    data: tuple[str, ...] = ("chat", "stdlib")
    num_prompts: int = 256
    max_new_tokens: int = 128
    temperature: float = 0.0
    dtype: str = "bfloat16"
    steps: int = 200
    batch_size: int = 4  # sequences per step
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_heads: int = 3  # medusa
    num_layers: int = 1  # medusa
    ce_weight: float = 0.1  # eagle
    feature_noise: float = 0.05  # eagle
    teacher_topk: int = 8  # the target's top-K per position kept as the distillation target
    eval_fraction: float = 0.05
    seed: int = 0
    max_num_seqs: int = 32
    init_from: str | None = None
    corpus_cache: str | None = None  # a .pt file for the answers and features (reused across methods)
    exclude_prompts: tuple[str, ...] = field(default=(), repr=False)
    log_every: int = 10

    def check(self) -> None:
        """Every bad value is a ``ValueError`` naming it."""
        if self.method not in METHODS:
            raise ValueError(f"draft-head: unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"draft-head: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for name in ("num_prompts", "max_new_tokens", "steps", "batch_size", "num_heads", "num_layers", "teacher_topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"draft-head: {name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0 or self.lr <= 0 or not 0 <= self.eval_fraction < 1:
            raise ValueError("draft-head: temperature must be >= 0, lr > 0 and 0 <= eval_fraction < 1")
        if self.method == "eagle" and (self.num_heads, self.num_layers) != (3, 1):
            raise ValueError("draft-head: num_heads and num_layers are Medusa settings; an EAGLE head has one layer")
        if self.method == "medusa" and (self.ce_weight, self.feature_noise) != (0.1, 0.05):
            raise ValueError("draft-head: ce_weight and feature_noise are EAGLE settings")
        data.check_sources(self.data)


@dataclass
class DraftHeadResult:
    out: Path
    history: list[dict[str, float]]  # per logged step
    eval: dict[str, float]  # held-out losses and top-1 agreement with the target
    num_samples: int
    num_answer_tokens: int
    seconds: dict[str, float]


def _init(cfg: DraftHeadConfig, target: data.Target) -> tuple[torch.nn.Module, dict]:
    """A fresh head, or the one ``init_from`` holds (same method, same target: checked)."""
    tcfg = target.config
    head_cfg = (hm.eagle_config(tcfg) if cfg.method == "eagle"
                else hm.medusa_config(tcfg, cfg.num_heads, cfg.num_layers))
    head = hm.new_head(cfg.method, head_cfg, tcfg, 4096, cfg.seed)
    if cfg.init_from:
        old_cfg, tensors = read_head(cfg.init_from, METHODS[cfg.method])
        check_target(old_cfg, target.model, cfg.init_from)
        if cfg.method == "medusa" and (old_cfg["num_heads"], old_cfg["num_layers"]) != (cfg.num_heads, cfg.num_layers):
            raise ValueError(f"draft-head: init_from {cfg.init_from} has {old_cfg['num_heads']} heads x "
                             f"{old_cfg['num_layers']} layers, this run asks for {cfg.num_heads} x {cfg.num_layers}")
        head.load(tensors)
    return head, head_cfg


def _lr_lambda(cfg: DraftHeadConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def _loss(cfg: DraftHeadConfig, head, target, batch, gen=None, vocab=None):
    if cfg.method == "eagle":
        return hm.eagle_loss(head, target, batch, cfg.ce_weight, cfg.feature_noise, gen, vocab)
    return hm.medusa_loss(head, target, batch, vocab)


class DraftHeadTrainer:
    """The head, its optimizer and the features; ``step()`` runs one optimizer step."""

    def __init__(self, cfg: DraftHeadConfig, target: data.Target, samples: list[data.Sample],
                 feats: list[torch.Tensor], tops: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.cfg, self.target = cfg, target
        self.head, self.head_cfg = _init(cfg, target)
        n_eval = int(len(samples) * cfg.eval_fraction)
        self.train_idx = list(range(n_eval, len(samples)))
        self.eval_idx = list(range(n_eval))
        if not self.train_idx:
            raise ValueError(f"draft-head: no training samples left ({len(samples)} generated, {n_eval} held out)")
        self.samples, self.feats = samples, feats
        self.tops = tops if tops is not None else target.teacher_topk(feats, cfg.teacher_topk)
        self.vocab = hm.Vocab.build(target, [t[0] for t in self.tops])
        self.opt = torch.optim.AdamW(self.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg))
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.order: list[int] = []
        self.step_num = 0

    def _next(self) -> hm.Batch:
        idx = []
        while len(idx) < self.cfg.batch_size:
            if not self.order:
                self.order = self.train_idx[:]
                self.rng.shuffle(self.order)
            idx.append(self.order.pop())
        return hm.collate([self.samples[i] for i in idx], [self.feats[i] for i in idx], [self.tops[i] for i in idx])

    def step(self) -> dict[str, float]:
        self.head.train()
        loss, m = _loss(self.cfg, self.head, self.target, self._next(), self.gen, self.vocab)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.cfg.max_grad_norm))
        self.opt.step()
        self.sched.step()
        self.step_num += 1
        return {"step": self.step_num, **m}

    @torch.no_grad()
    def evaluate(self, idx: list[int] | None = None) -> dict[str, float]:
        """Token-weighted mean of every metric over ``idx`` (default: the held-out samples): no
        noise, the full vocabulary and the target's full distribution."""
        idx = self.eval_idx if idx is None else idx
        self.head.eval()
        sums: dict[str, float] = {}
        weight = 0
        for i in idx:
            b = hm.collate([self.samples[i]], [self.feats[i]])
            _, m = (hm.eagle_loss(self.head, self.target, b, self.cfg.ce_weight, 0.0)
                    if self.cfg.method == "eagle" else hm.medusa_loss(self.head, self.target, b))
            w = int(b.target_mask(2).sum())
            weight += w
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v * w
        return {k: v / weight for k, v in sums.items()} if weight else {}

    def save(self, out: str | Path, meta: dict) -> Path:
        cfg = dict(self.head_cfg, target=self.cfg.target, target_signature=target_signature(self.target.model),
                   training=meta)
        return write_head(out, cfg, hm.head_tensors(self.cfg.method, self.head, self.target.config))


def _log(msg: str) -> None:
    print(f"[draft-head] {msg}", flush=True)


def _corpus(cfg: DraftHeadConfig, serve: data.Target, say) -> tuple[list[data.Sample], list[torch.Tensor], list]:
    """The target's answers and features; with ``corpus_cache`` they are read from (or written
    to) that file, keyed by every setting they depend on (a stale file is regenerated)."""
    key = {k: getattr(cfg, k) for k in ("target", "data", "num_prompts", "max_new_tokens", "temperature",
                                        "dtype", "seed", "exclude_prompts")}
    key = json.loads(json.dumps(key))
    path = Path(cfg.corpus_cache) if cfg.corpus_cache else None
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["key"] == json.dumps(key, sort_keys=True):
            say(f"answers and features from {path}")
            samples = [data.Sample(tuple(t), p) for t, p in zip(saved["tokens"], saved["prompt_lens"])]
            tops = saved.get("tops")
            if tops is None or tops[0][0].shape[-1] != cfg.teacher_topk:
                tops = serve.teacher_topk(saved["feats"], cfg.teacher_topk)
                torch.save({**saved, "tops": tops}, path)
            return samples, saved["feats"], tops
        say(f"{path} holds another corpus: regenerating")
    prompts = data.load_prompts(cfg.data, cfg.num_prompts, cfg.seed, cfg.exclude_prompts)
    say(f"{len(prompts)} prompts; generating up to {cfg.max_new_tokens} tokens each with {cfg.target}")
    samples = data.generate_samples(cfg.target, prompts, max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, seed=cfg.seed, dtype=cfg.dtype,
                                    max_num_seqs=cfg.max_num_seqs)
    say(f"features of {sum(len(s.tokens) for s in samples)} tokens")
    feats = serve.features(samples)
    tops = serve.teacher_topk(feats, cfg.teacher_topk)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": json.dumps(key, sort_keys=True), "tokens": [list(s.tokens) for s in samples],
                    "prompt_lens": [s.prompt_len for s in samples], "feats": feats, "tops": tops}, path)
    return samples, feats, tops


def train_draft_head(cfg: DraftHeadConfig, progress: bool = True) -> DraftHeadResult:
    cfg.check()
    say = _log if progress else (lambda _m: None)
    t0 = time.perf_counter()
    serve = data.load_target(cfg.target, DTYPES[cfg.dtype])
    if cfg.init_from:  # refuse a head of another method or target before generating anything
        old_cfg, _ = read_head(cfg.init_from, METHODS[cfg.method])
        check_target(old_cfg, serve.model, cfg.init_from)
    samples, feats, tops = _corpus(cfg, serve, say)
    t1 = time.perf_counter()
    del serve
    target = data.load_target(cfg.target, torch.float32)
    t2 = t1
    n_answer = sum(len(s.tokens) - s.prompt_len for s in samples)
    say(f"{len(samples)} samples, {n_answer} answer tokens; answers and features in {t1 - t0:.0f}s")
    tr = DraftHeadTrainer(cfg, target, samples, feats, tops)
    say(f"training vocabulary: {len(tr.vocab.ids)} tokens (the target's top-{cfg.teacher_topk} over the corpus)")
    history = []
    for _ in range(cfg.steps):
        m = tr.step()
        if m["step"] % cfg.log_every == 0 or m["step"] in (1, cfg.steps):
            history.append(m)
            say(" ".join(f"{k} {v:.4g}" for k, v in m.items()))
    t3 = time.perf_counter()
    ev = tr.evaluate()
    say("held-out: " + " ".join(f"{k} {v:.4g}" for k, v in ev.items()))
    meta = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("exclude_prompts", "corpus_cache")},
            "num_samples": len(samples), "num_answer_tokens": n_answer, "eval": ev}
    out = tr.save(cfg.out, meta)
    say(f"saved {cfg.method} head to {out}")
    return DraftHeadResult(out, history, ev, len(samples), n_answer,
                           {"corpus": t1 - t0, "train": t3 - t2})


def config_json(result: DraftHeadResult) -> str:
    return json.dumps({"out": str(result.out), "eval": result.eval, "seconds": result.seconds}, indent=1)
