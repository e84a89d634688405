"""Draft heads in training: construction, the self-distillation losses, export in the proposers' format.

The modules are the proposers' own (``spec_decode/heads.py``: ``EagleHead``, ``MedusaHeads``) in
plain mode, so what trains is what serves. Both losses distil the target's distribution for the
token a head predicts (soft labels: ``softmax(lm_head(f))`` at the position whose next token it
is), on positions whose predicted token belongs to the target's answer (not the prompt):

- EAGLE (as EAGLE-1 does): input at position p is ``fc([f_p + noise, embed(t_{p+1})])``; the head's
  normed output ``g_p`` regresses ``f_{p+1}`` (smooth L1) and ``lm_head(g_p)`` is trained with the
  cross-entropy to the target's distribution of ``t_{p+2}`` (``softmax(lm_head(f_{p+1}))``),
  ``loss = reg + ce_weight * kl`` (the KL divergence: the cross-entropy less the target's
  entropy, so the same gradient). The noise (uniform, ``feature_noise`` x the features' std) stands
  in for the drift of fed-back features in later draft steps.
- Medusa: head j on ``f_p`` predicts ``t_{p+2+j}``; cross-entropy to ``softmax(lm_head(f_{p+1+j}))``,
  head j weighted ``0.8 ** j`` (Medusa's decay). Blocks start at zero (each head starts as the
  identity, i.e. the target's own next-token guess), the target's LM head is shared and frozen.

Training computes the distillation over ``Vocab`` (the tokens in the target's top-K anywhere in
the corpus) with the teacher's top-K renormalised; evaluation over the full vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.spec_decode.heads import EAGLE_FORMAT, MEDUSA_FORMAT, EagleHead, MedusaHeads
from fleetlm.train.draft_head_data import Sample, Target


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] tokens (right-padded with 0)
    feats: torch.Tensor  # [B, T, H] the target's final normed hidden states (float32)
    lengths: torch.Tensor  # [B]
    prompt_lens: torch.Tensor  # [B]
    top_ids: torch.Tensor | None = None  # [B, T, K] row q: the target's top-K tokens for t_{q+1}
    top_logp: torch.Tensor | None = None  # [B, T, K] their log-probabilities

    def target_mask(self, offset: int) -> torch.Tensor:
        """[B, T - offset]: position p is trained when token ``p + offset`` exists and is part of
        the answer."""
        idx = torch.arange(self.ids.shape[1] - offset).unsqueeze(0) + offset
        return (idx < self.lengths.unsqueeze(1)) & (idx >= self.prompt_lens.unsqueeze(1))


@dataclass
class Vocab:
    """The training vocabulary: every token that is in the target's top-K somewhere in the corpus.
    Training logits are computed over it only (the LM head's rows ``ids``), the teacher is its
    top-K renormalised: the LM head is by far the largest cost on a CPU, and tokens the target
    never ranks in its top-K here carry almost no probability. Evaluation uses the full vocabulary."""

    ids: torch.Tensor  # [S]
    index: torch.Tensor  # [V] position in ``ids`` (-1: not in it)
    weight: torch.Tensor  # [S, H] the LM head's rows, float32

    @classmethod
    def build(cls, target: Target, top_ids: Sequence[torch.Tensor]) -> Vocab:
        ids = torch.unique(torch.cat([t.reshape(-1).long() for t in top_ids]))
        index = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
        index[ids] = torch.arange(len(ids))
        w = target.model.lm_head.weight[: target.config.vocab_size].detach().float()
        return cls(ids, index, w[ids].contiguous())


def collate(samples: Sequence[Sample], feats: Sequence[torch.Tensor],
            tops: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Batch:
    t = max(len(s.tokens) for s in samples)
    h = feats[0].shape[-1]
    ids = torch.zeros(len(samples), t, dtype=torch.long)
    f = torch.zeros(len(samples), t, h)
    for i, (s, x) in enumerate(zip(samples, feats)):
        ids[i, : len(s.tokens)] = torch.tensor(s.tokens)
        f[i, : len(s.tokens)] = x
    b = Batch(ids, f, torch.tensor([len(s.tokens) for s in samples]), torch.tensor([s.prompt_len for s in samples]))
    if tops is not None:
        k = tops[0][0].shape[-1]
        b.top_ids = torch.zeros(len(samples), t, k, dtype=torch.long)
        b.top_logp = torch.zeros(len(samples), t, k)
        for i, (ti, tl) in enumerate(tops):
            b.top_ids[i, : len(ti)], b.top_logp[i, : len(tl)] = ti.long(), tl.float()
    return b


def teacher_probs(target: Target, b: Batch, start: int, n: int, mask: torch.Tensor,
                  vocab: Vocab | None) -> torch.Tensor:
    """[rows, V or S]: the target's distribution of ``t_{q+1}`` for the masked rows among
    ``q = start .. start+n-1`` (``mask`` is [B, n])."""
    if vocab is None:
        with torch.no_grad():
            return F.softmax(target.logits(b.feats[:, start : start + n][mask]), -1)
    p = F.softmax(b.top_logp[:, start : start + n][mask], -1)
    dense = torch.zeros(p.shape[0], len(vocab.ids))
    return dense.scatter_(-1, vocab.index[b.top_ids[:, start : start + n][mask]], p)


def student_logits(target: Target, h: torch.Tensor, vocab: Vocab | None) -> torch.Tensor:
    """Logits of the rows ``h`` [rows, H]: the LM head's full vocabulary, or ``vocab``'s rows of it."""
    return target.logits(h) if vocab is None else F.linear(h, vocab.weight)


def eagle_config(target_cfg) -> dict:
    c = target_cfg
    return {"format": EAGLE_FORMAT, "version": 1, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
            "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "intermediate_size": c.intermediate_size, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
            "fc_bias": False}


def medusa_config(target_cfg, num_heads: int, num_layers: int) -> dict:
    return {"format": MEDUSA_FORMAT, "version": 1, "hidden_size": target_cfg.hidden_size,
            "vocab_size": target_cfg.vocab_size, "num_heads": num_heads, "num_layers": num_layers,
            "has_lm_head": False}


def new_head(method: str, cfg: dict, target_cfg, max_positions: int, seed: int) -> nn.Module:
    """A fresh head in float32: EAGLE normal(0, 0.02) matrices and unit norms; Medusa zero blocks."""
    torch.manual_seed(seed)
    if method == "eagle":
        head = EagleHead(cfg, target_cfg, torch.float32, max_positions, 0)
        for name, p in head.named_parameters():
            nn.init.ones_(p) if "layernorm" in name else nn.init.normal_(p, std=0.02)
    else:
        head = MedusaHeads(cfg, torch.float32)
        for p in head.parameters():
            nn.init.zeros_(p)
    return head.train()


def soft_kl(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean KL divergence from the ``teacher`` probabilities to the ``student`` logits' softmax
    over the rows (the cross-entropy less the teacher's entropy: same gradient, 0 at a perfect
    fit), and the top-1 agreement (what greedy verification accepts). The LM head is the cost
    on a CPU, so callers pass only the rows that are trained."""
    if student.numel() == 0:
        zero = student.sum() * 0
        return zero, zero.detach()
    kl = (torch.special.xlogy(teacher, teacher) - teacher * F.log_softmax(student, -1)).sum(-1).mean()
    return kl, (student.argmax(-1) == teacher.argmax(-1)).float().mean()


def eagle_loss(head: EagleHead, target: Target, b: Batch, ce_weight: float, noise: float,
               gen: torch.Generator | None = None, vocab: Vocab | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    f = b.feats
    inp = f[:, :-1]
    if noise > 0:
        u = torch.rand(inp.shape, generator=gen) - 0.5
        inp = inp + u * (2 * noise * f.std())
    pos = torch.arange(inp.shape[1])
    g = target.norm(head(inp, target.embed(b.ids[:, 1:]), pos))  # g_p for p = 0 .. T-2
    reg_mask = b.target_mask(1)  # regression target f_{p+1}: a feature of the answer's positions
    reg = F.smooth_l1_loss(g[reg_mask], f[:, 1:][reg_mask]) if reg_mask.any() else g.sum() * 0
    n, mask = f.shape[1] - 2, b.target_mask(2)  # g_p predicts t_{p+2}: the target's distribution at row p + 1
    kl, acc = soft_kl(student_logits(target, g[:, :n][mask], vocab), teacher_probs(target, b, 1, n, mask, vocab))
    loss = reg + ce_weight * kl
    return loss, {"loss": loss.item(), "reg": reg.item(), "kl": kl.item(), "top1": acc.item()}


def medusa_loss(heads: MedusaHeads, target: Target, b: Batch,
                vocab: Vocab | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    f = b.feats
    total, out = f.new_zeros(()), {}
    for j in range(len(heads.heads)):
        n = f.shape[1] - 2 - j  # positions p with p + 2 + j < T
        if n <= 0:
            continue
        mask = b.target_mask(2 + j)
        student = student_logits(target, heads.hidden(j, f[:, :n][mask]), vocab)
        kl, acc = soft_kl(student, teacher_probs(target, b, 1 + j, n, mask, vocab))
        total = total + (0.8 ** j) * kl
        out[f"kl{j}"], out[f"top1_{j}"] = kl.item(), acc.item()
    out["loss"] = total.item()
    return total, out


def head_tensors(method: str, head: nn.Module, target_cfg) -> dict[str, torch.Tensor]:
    """The head's tensors under the names the proposers load (Hugging Face names for EAGLE's layer)."""
    sd = {k: v.detach().float().contiguous() for k, v in head.state_dict().items() if "rotary_emb" not in k}
    if method == "medusa":
        return sd
    from fleetlm.train.export import hf_tensors

    hf = {"num_attention_heads": target_cfg.num_heads, "head_dim": target_cfg.head_dim,
          "num_key_value_heads": target_cfg.num_kv_heads, "tie_word_embeddings": False}
    return hf_tensors(sd, hf)
