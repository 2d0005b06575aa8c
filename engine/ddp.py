"""DistributedDataParallel without copies of the gradients into its buckets, and a check that every
process was started with the same config."""
from typing import Callable

import torch
import torch.nn as nn

from .config_merge import config_differences
from errors import UserError
from utils import all_gather_objects, is_distributed


def match_grad_layout(model: nn.Module, run_backward: Callable[[nn.Module], None]) -> nn.Module:
    """Give every parameter the strides its gradient gets, so DistributedDataParallel's buckets need
    no copies (and it does not warn). FocalNet runs its convolutions on channels-last memory, so the
    depth-wise and 1x1 kernels get channels-last gradients, whose strides differ from the defaults only
    in dimensions of size one; which ones differ depends on the device. ``run_backward(model)`` runs
    one backward pass on a small input (in eval mode: no random draws) and tells; only the strides
    change, never a value."""
    model.eval()
    run_backward(model)
    for p in model.parameters():
        if p.grad is not None and p.grad.stride() != p.stride():
            p.data = torch.empty_strided(p.shape, p.grad.stride(), dtype=p.dtype,
                                         device=p.device).copy_(p.data)
    model.zero_grad(set_to_none=True)
    return model


def wrap_ddp(model: nn.Module, device: torch.device, **kwargs) -> nn.Module:
    """The model itself in a single process; wrapped in DistributedDataParallel otherwise."""
    if not is_distributed():
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None, **kwargs)


def check_same_config(config):
    """Every process must run the same config; ranks started with different commands would otherwise
    meet only in a collective that never matches, and wait until the timeout. Compared at start, on
    every process, which all stop with the same line."""
    texts = all_gather_objects(config.dump())
    for rank, text in enumerate(texts):
        if text != texts[0]:
            differences = config_differences(texts[0], config.load_cfg(text))
            shown = '; '.join(f'{k} {b!r} where rank 0 has {a!r}' for k, a, b in differences[:5])
            more = f' and {len(differences) - 5} more' if len(differences) > 5 else ''
            raise UserError(f'the processes were started with different configs: rank {rank} has '
                            f'{shown}{more}; start every process with the same command')
