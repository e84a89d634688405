"""Training an MoE: the router losses' values on hand-made routings, and 200 steps of a tiny
Mixtral (small vocabulary, skewed data) trained through ``TrainingLM`` (the objective
``fleetlm train`` optimises): with the load-balancing loss the expert load evens out, without it
the imbalance stays."""

from __future__ import annotations

import math

import pytest
import torch

from fleetlm.moe.losses import MoELoss, load_balancing_loss, moe_loss_for, router_z_loss
from fleetlm.moe.report import imbalance


def test_loss_values_on_hand_made_routings():
    uniform = torch.zeros(8, 4)
    assert load_balancing_loss(uniform, 1).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[20.0, 0, 0, 0]] * 8)  # every token on expert 0 with p ~ 1
    assert load_balancing_loss(collapsed, 1).item() == pytest.approx(4.0, rel=1e-6)
    assert router_z_loss(uniform).item() == pytest.approx(math.log(4) ** 2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.moe_helpers import make_tiny_moe_dir

    return make_tiny_moe_dir(tmp_path_factory.mktemp("moe_train"), "mixtral", vocab_size=256, num_hidden_layers=2)


def _tiny(path):
    from fleetlm.models.loader import load_model_files
    from fleetlm.models.registry import get_model_class

    files = load_model_files(path, torch.float32)
    model = get_model_class(files.config.architecture)(files.config, torch.float32, 128)
    model.load_weights(files.weights)
    return model.requires_grad_(True).train()


def _train(model, coef: float, steps: int = 200) -> list[float]:
    from fleetlm.train.loss import TrainingLM

    torch.manual_seed(0)
    root = TrainingLM(model, MoELoss(coef, 0.0) if coef else None)
    opt = torch.optim.AdamW([p for p in root.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 16, (64, 33), generator=g)  # 16 of 256 ids: a skewed corpus
    for step in range(steps):
        rows = data[(step * 4) % 64 : (step * 4) % 64 + 4]
        opt.zero_grad()
        root(rows[:, :-1], rows[:, 1:]).backward()
        opt.step()
    for m in model.moe_layers().values():
        m.stats.reset()
    with torch.no_grad():
        model(data[:, :-1])
    return [imbalance(m.stats.snapshot().tokens) for m in model.moe_layers().values()]


def test_balancing_loss_evens_out_expert_load(tiny_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread beats waking a pool 200 x 20 times a step
    try:
        without = _train(_tiny(tiny_dir), 0.0)
        with_aux = _train(_tiny(tiny_dir), 0.5)
    finally:
        torch.set_num_threads(threads)
    assert min(without) >= 1.5, without  # the imbalance a router left alone keeps
    assert max(with_aux) <= 1.2, with_aux
    assert all(b < a for a, b in zip(without, with_aux))


def test_router_loss_settings_are_checked():
    from fleetlm.train.config import load_config

    with pytest.raises(ValueError, match="moe.z_loss_coef must be >= 0, got -1.0"):
        load_config(None, ['model.size="tiny"', "moe.z_loss_coef=-1.0"])

    class Dense:
        config = type("C", (), {"moe": None})()

    with pytest.raises(ValueError, match="apply to mixture-of-experts models; this model is dense"):
        moe_loss_for(Dense(), 0.01, 0.0)
    assert moe_loss_for(Dense(), None, 0.0) is None
