"""A loader's batches moved to the training device one step ahead.

Moving a batch of the fast input path to a GPU queues more than a copy: the flip and RandAugment's
ops, normalisation and random erasing (data.fast_transform.RawBatch.to), several hundred small
kernels. Queued at the top of the step, the host's time spent queueing them adds to the step while
the GPU waits. :class:`DeviceBatches` lets the step queue the *next* batch's move while the device is
busy with the current backward pass (``OptimizerStep``'s ``while_busy``), so that time overlaps the
device's work. The batches, their order and every random number are unchanged; one more batch lives
on the device, from the backward pass of a step to the start of the next.
"""
from typing import Iterable, Optional, Tuple, Union

import torch


class DeviceBatches:
    """Iterates ``(images, targets)`` of ``loader`` already on ``device``. :meth:`prepare_next` fetches
    the next batch and queues its move; ``next()`` returns it (preparing it then if nobody did). An
    error the loader raises while a batch is prepared early is raised when that batch is asked for,
    so a step never ends early because of the batch after it."""

    def __init__(self, loader: Iterable, device: torch.device):
        self.batches, self.device = iter(loader), device
        self.ready: Optional[Union[Tuple[torch.Tensor, torch.Tensor], Exception]] = None

    def __iter__(self) -> 'DeviceBatches':
        return self

    def prepare_next(self):
        if self.ready is not None:
            return
        try:
            images, targets = next(self.batches)
            self.ready = (images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True))
        except Exception as e:  # StopIteration too: the loop ends when it asks for the next batch
            self.ready = e

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        self.prepare_next()
        ready, self.ready = self.ready, None
        if isinstance(ready, Exception):
            raise ready
        return ready
