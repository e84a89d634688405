"""Router losses for training an MoE with ``fleetlm train`` (section ``[moe]``).

- Load balancing (Switch Transformer / Mixtral style): per MoE layer
  ``E * sum_e f_e * P_e``, with ``f_e`` the fraction of the layer's top-k assignments routed to
  expert ``e`` and ``P_e`` the mean router probability of ``e`` over the tokens; it is 1.0 when
  both are uniform and grows as the load concentrates (only ``P`` carries the gradient).
  (transformers' ``load_balancing_loss_func`` divides ``f`` by tokens, not assignments: its value
  is ``k`` times this one.)
- Router z-loss (ST-MoE): the mean over tokens of ``logsumexp(router logits)^2``; keeps the
  router logits small so the softmax stays well-conditioned.

Both are averaged over the MoE layers and added to the next-token loss with their coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    probs = torch.softmax(router_logits.float(), dim=-1)
    n_exp = probs.shape[-1]
    ids = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
    f = torch.bincount(ids, minlength=n_exp).to(probs.dtype) / ids.numel()
    return n_exp * torch.sum(f * probs.mean(0))


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


@dataclass(frozen=True)
class MoELoss:
    aux_loss_coef: float
    z_loss_coef: float

    def __call__(self, lm) -> torch.Tensor:
        """The weighted router losses of the forward ``lm`` just ran (0 if no MoE layer routed)."""
        layers = [m for m in lm.moe_layers().values() if m.router_logits is not None]
        if not layers:
            return torch.zeros(())
        total = torch.zeros((), dtype=torch.float32)
        for m in layers:
            if self.aux_loss_coef:
                total = total + self.aux_loss_coef * load_balancing_loss(m.router_logits, m.top_k)
            if self.z_loss_coef:
                total = total + self.z_loss_coef * router_z_loss(m.router_logits)
            m.router_logits = None
        return total / len(layers)


def moe_loss_for(lm, aux_loss_coef: float | None, z_loss_coef: float) -> MoELoss | None:
    """The router losses for model ``lm`` (``aux_loss_coef`` None: the model's
    ``router_aux_loss_coef``); None when there is nothing to add. A dense model given a
    coefficient is refused."""
    moe = getattr(lm.config, "moe", None)
    if moe is None:
        if aux_loss_coef or z_loss_coef:
            raise ValueError("moe.aux_loss_coef / moe.z_loss_coef apply to mixture-of-experts models; "
                             "this model is dense")
        return None
    aux = moe.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef
    return MoELoss(aux, z_loss_coef) if aux or z_loss_coef else None
