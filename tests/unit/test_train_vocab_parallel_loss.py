"""The vocabulary-parallel cross entropy (train/loss.py) on one rank of a one-process group: the
padded columns past the vocabulary take no part, and loss and gradient equal PyTorch's
cross entropy over the real columns (the TP=2 equality with one process is in
test_train_parallel.py)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F


def test_padding_columns_are_ignored_and_the_gradient_is_softmax_minus_onehot():
    from fleetlm.train.loss import _VocabParallelCE

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(6, 10, generator=g)
        logits[:, 7:] = 50.0  # padding rows of the head: huge, and must not count
        targets = torch.tensor([0, 6, 3, 3, 1, 5])
        ours = logits.clone().requires_grad_(True)
        loss = _VocabParallelCE.apply(ours, targets, 0, 7).mean()
        loss.backward()
        ref = logits[:, :7].clone().requires_grad_(True)
        want = F.cross_entropy(ref, targets)
        want.backward()
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(ours.grad[:, :7], ref.grad)
        assert (ours.grad[:, 7:] == 0).all()
    finally:
        dist.destroy_process_group()
