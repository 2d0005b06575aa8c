"""One optimizer step over one or more micro-batches, the same for every task.

Autocast, a scaled backward pass, gradients exchanged between processes only on the micro-batch that
ends the step, unscaling, clipping, and a stop before any update that would make the weights
non-finite.
"""
import math
from contextlib import nullcontext
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from errors import TrainingStopped
from utils import all_reduce_sum, get_world_size, is_distributed


def check_update(scaler: torch.amp.GradScaler, grad_norm: torch.Tensor, where: str):
    """Stop before an update that would make the weights non-finite. With a float16 scaler an
    overflowing step is skipped and the scale halved, as usual; a scale driven below 1 means the
    gradients overflow whatever the scale, and training stops. ``where`` ends the message."""
    if not scaler.is_enabled():
        if not math.isfinite(grad_norm.item()):
            raise TrainingStopped(f'the gradient norm is {grad_norm.item()} {where}')
    elif scaler.get_scale() < 1.0:
        raise TrainingStopped(f'float16 gradients overflow persistently (loss scale '
                              f'{scaler.get_scale():g}) {where}')


class OptimizerStep:
    """Calls ``compute_loss`` for one micro-batch and, on the last micro-batch of an optimizer step,
    updates the weights.

    ``model`` is what the loss is computed through (the DDP wrapper when distributed), ``module`` the
    bare model whose parameters are clipped. ``accumulation`` micro-batches make one step;
    ``clip_grad`` <= 0 turns clipping off.
    """

    def __init__(self, model: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, autocast: Callable, accumulation: int = 1,
                 clip_grad: float = 0.0):
        self.model, self.module, self.optimizer, self.scaler = model, module, optimizer, scaler
        self.autocast = autocast
        self.accumulation = max(1, accumulation)
        self.clip = clip_grad if clip_grad > 0 else math.inf
        self.grad_norm = torch.tensor(0.0)  # of the last update

    def ends_step(self, index: int, num_micro: int) -> bool:
        """Whether micro-batch ``index`` of ``num_micro`` (in an epoch or run) ends an optimizer step."""
        return (index + 1) % self.accumulation == 0 or index + 1 == num_micro

    def __call__(self, compute_loss: Callable[[], torch.Tensor], index: int, num_micro: int,
                 where: str, while_busy: Optional[Callable[[], None]] = None) -> Tuple[float, Optional[torch.Tensor]]:
        """(loss averaged over processes, gradient norm or None when no update was made).
        ``where`` ("at epoch 3 step 10/500; ...") ends the message of a stop. ``while_busy`` is called
        once the backward pass is queued, before the step next waits for the device (the loop
        prepares its next batch there: engine.ahead); the activations are free by then, so what
        it allocates does not add to the step's peak memory."""
        last = self.ends_step(index, num_micro)
        sync = nullcontext() if last or not is_distributed() else self.model.no_sync()
        with sync:
            with self.autocast():
                loss = compute_loss()
            # Summed over processes before the backward pass, so that every process sees a
            # non-finite loss and stops at the same step.
            loss_value = all_reduce_sum(loss.detach().float()).item() / get_world_size()
            if not math.isfinite(loss_value):
                raise TrainingStopped(f'the loss is {loss_value} {where}')
            self.scaler.scale(loss / self.accumulation).backward()
        if while_busy is not None:
            while_busy()  # the device is still running the backward pass
        if not last:
            return loss_value, None
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        check_update(self.scaler, grad_norm, where)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_norm = grad_norm
        return loss_value, grad_norm
