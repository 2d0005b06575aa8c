"""The optimizer: AdamW (or SGD) with no weight decay on norms, biases and layer scales, and optional
layer-wise learning-rate decay (TRAIN.LAYER_DECAY) for fine-tuning."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from errors import UserError


def _decays(name: str, param: torch.Tensor, skip: set) -> bool:
    """One-dimensional parameters (norm weights, biases, layer scales) and those the model names in
    ``no_weight_decay()`` are not decayed."""
    return not (param.ndim <= 1 or name.endswith('.bias') or name in skip)


def layer_ids(model: nn.Module) -> Tuple[Dict[str, int], int]:
    """(parameter name -> layer index, number of layers) from the model's ``group_matcher()``: the
    stem is layer 0, each block one layer, the classifier the last (timm's grouping)."""
    from timm.models import group_parameters
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    return groups, max(groups.values()) + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> List[dict]:
    """Parameter groups with and without weight decay, decayed first (the order of the official
    checkpoints' optimizer state).

    With ``layer_decay`` < 1 each layer of ``layer_ids`` gets its own pair of groups whose learning
    rate is scaled by ``layer_decay ** (last layer - layer)``: the classifier learns at the full
    rate, the block below it at ``layer_decay`` times that, and so on down to the stem. Each group
    carries that factor as ``lr_scale``, which timm's schedulers (lr_scheduler.py) apply to the
    rate they set; the groups are listed from the classifier down, so the first group's rate is the
    schedule's.
    """
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if layer_decay == 1.0:
        decay = [p for n, p in named if _decays(n, p, skip)]
        no_decay = [p for n, p in named if not _decays(n, p, skip)]
        return [{'params': decay, 'weight_decay': weight_decay},
                {'params': no_decay, 'weight_decay': 0.0}]
    if not 0.0 < layer_decay < 1.0:
        raise ValueError(f'layer_decay must be in (0, 1] (1 turns it off); got {layer_decay}')
    if not hasattr(model, 'group_matcher'):
        raise ValueError(f'layer-wise learning-rate decay needs a model with group_matcher(); '
                         f'{type(model).__name__} has none')
    ids, num_layers = layer_ids(model)
    groups: Dict[Tuple[int, bool], dict] = {}
    for name, param in named:
        layer = ids[name]
        decays = _decays(name, param, skip)
        group = groups.setdefault((layer, decays), {
            'params': [], 'weight_decay': weight_decay if decays else 0.0,
            'lr_scale': layer_decay ** (num_layers - 1 - layer)})
        group['params'].append(param)
    return [groups[key] for key in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def build_optimizer(config, model: nn.Module, lr_scale: float = 1.0,
                    groups: Optional[List[dict]] = None) -> torch.optim.Optimizer:
    """``model`` is the bare module (not the DDP wrapper); the learning rate is TRAIN.BASE_LR * lr_scale
    (config.lr_scale), which the scheduler then varies per step (times each group's ``lr_scale``
    under TRAIN.LAYER_DECAY). ``groups`` replaces param_groups' grouping (a task whose official
    recipe decays other parameters)."""
    opt = config.TRAIN.OPTIMIZER
    if not 0.0 < config.TRAIN.LAYER_DECAY <= 1.0:
        raise UserError(f'TRAIN.LAYER_DECAY must be in (0, 1] (1 turns it off); '
                        f'got {config.TRAIN.LAYER_DECAY}')
    if groups is None:
        groups = param_groups(model, config.TRAIN.WEIGHT_DECAY, config.TRAIN.LAYER_DECAY)
    lr = config.TRAIN.BASE_LR * lr_scale
    for group in groups:
        if 'lr_scale' in group:
            # The rate is right from the first step; the schedulers take their base rate from
            # 'initial_lr' and multiply by 'lr_scale' themselves.
            group['lr'], group['initial_lr'] = lr * group['lr_scale'], lr
    if opt.NAME == 'adamw':
        return torch.optim.AdamW(groups, lr=lr, eps=opt.EPS, betas=tuple(opt.BETAS))
    if opt.NAME == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=opt.MOMENTUM, nesterov=True)
    raise ValueError(f'unknown TRAIN.OPTIMIZER.NAME {opt.NAME!r}; expected "adamw" or "sgd"')
