"""DistributedDataParallel without copies of the gradients into its buckets."""
from typing import Callable

import torch
import torch.nn as nn

from utils import is_distributed


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
