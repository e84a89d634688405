"""Adapters on a worker's model, and the per-step grouping of tokens by adapter.

``LoRAManager.add`` attaches a ``LoRASlots`` to each linear layer an adapter targets (one forward
hook per layer, registered once). During a step, ``ModelRunner`` sets the batch's groups
(``lora_batch``): per adapter, the indices of its tokens in the flattened batch (None when every
token of the step uses it). The hook adds ``scale * B (A x)`` to those tokens' rows of that
adapter's targets; tokens of requests without an adapter are untouched, so a batch mixing
adapters and none computes each request exactly as it would alone.

Invariant: the groups cover disjoint token sets, so the order they are applied in does not
matter. Adapters are served at tensor_parallel_size 1 (the engine refuses more).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.lora.adapter import LoRAPiece, LoRAWeights

Groups = list[tuple[str, torch.Tensor | None]]
_BATCH: Groups = []


@contextlib.contextmanager
def lora_batch(groups: Groups) -> Iterator[None]:
    global _BATCH
    prev, _BATCH = _BATCH, groups
    try:
        yield
    finally:
        _BATCH = prev


def token_groups(adapters: Sequence[str | None], query_lens: Sequence[int], device: torch.device) -> Groups:
    """Per adapter, the flattened-token indices of the requests using it (rows in batch order)."""
    if not any(adapters):
        return []
    if all(a == adapters[0] for a in adapters):
        return [(adapters[0], None)]
    starts, pos, by_name = [], 0, {}
    for n in query_lens:
        starts.append(pos)
        pos += int(n)
    for i, name in enumerate(adapters):
        if name is not None:
            by_name.setdefault(name, []).append(torch.arange(starts[i], starts[i] + int(query_lens[i])))
    return [(name, torch.cat(idx).to(device)) for name, idx in by_name.items()]


class LoRASlots:
    """The adapters one linear layer serves: adapter name -> its pieces on this layer."""

    def __init__(self) -> None:
        self.adapters: dict[str, list[LoRAPiece]] = {}


def _apply(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    if not _BATCH:
        return out
    x, slots = args[0], module.lora_slots.adapters
    for name, idx in _BATCH:
        pieces = slots.get(name)
        if not pieces:
            continue
        xs = x if idx is None else x.index_select(0, idx)
        for p in pieces:
            delta = F.linear(F.linear(xs, p.A), p.B) * p.scale
            view = out[..., p.row_start : p.row_start + p.rows]
            if idx is None:
                view += delta
            else:
                view.index_add_(0, idx, delta)
    return out


class LoRAManager:
    """The adapters loaded on one worker's model (this rank's layers)."""

    def __init__(self, model: nn.Module, max_loras: int) -> None:
        self.model = model
        self.max_loras = max_loras
        self.loaded: dict[str, LoRAWeights] = {}

    def add(self, weights: LoRAWeights) -> None:
        if weights.name in self.loaded:
            raise ValueError(f"LoRA adapter {weights.name!r} is already loaded")
        if len(self.loaded) >= self.max_loras:
            raise ValueError(f"{len(self.loaded)} LoRA adapters are loaded, the most --max-loras allows; "
                             "unload one first")
        for layer, modules in weights.pieces.items():
            for path, pieces in modules.items():
                self._slots(self.model.layers[layer].get_submodule(path)).adapters[weights.name] = pieces
        self.loaded[weights.name] = weights

    def remove(self, name: str) -> None:
        weights = self.loaded.pop(name, None)
        if weights is None:
            raise ValueError(f"LoRA adapter {name!r} is not loaded")
        for layer, modules in weights.pieces.items():
            for path in modules:
                self.model.layers[layer].get_submodule(path).lora_slots.adapters.pop(name, None)

    @staticmethod
    def _slots(layer: nn.Module) -> LoRASlots:
        if not hasattr(layer, "lora_slots"):
            layer.lora_slots = LoRASlots()
            layer.register_forward_hook(_apply)
        return layer.lora_slots
