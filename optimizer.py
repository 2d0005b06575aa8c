"""The optimizer: AdamW (or SGD) with no weight decay on norms, biases and layer scales."""
from typing import List

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Two groups, decayed first (the order of the official checkpoints' optimizer state). One-dimensional
    parameters (norm weights, biases, layer scales) and those the model names in ``no_weight_decay()``
    are not decayed."""
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith('.bias') or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


def build_optimizer(config, model: nn.Module, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """``model`` is the bare module (not the DDP wrapper); the learning rate is TRAIN.BASE_LR * lr_scale
    (config.lr_scale), which the scheduler then varies per step."""
    opt = config.TRAIN.OPTIMIZER
    groups = param_groups(model, config.TRAIN.WEIGHT_DECAY)
    lr = config.TRAIN.BASE_LR * lr_scale
    if opt.NAME == 'adamw':
        return torch.optim.AdamW(groups, lr=lr, eps=opt.EPS, betas=tuple(opt.BETAS))
    if opt.NAME == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=opt.MOMENTUM, nesterov=True)
    raise ValueError(f'unknown TRAIN.OPTIMIZER.NAME {opt.NAME!r}; expected "adamw" or "sgd"')
