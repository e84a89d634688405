"""``fleetlm train``: train the served model class (or a LoRA adapter on it) with DDP, FSDP2,
TP, PP and activation checkpointing (docs/TRAINING.md).

Python API: ``fleetlm.train.config.load_config(path, overrides)`` and
``fleetlm.train.trainer.train(cfg)`` (modules import torch.distributed lazily, so this package
import is free).
"""
