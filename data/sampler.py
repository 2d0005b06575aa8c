"""Training order and augmentation randomness that a run can resume part-way through an epoch.

A resumed epoch must see the same samples, augmented the same way, as an uninterrupted one. Both are
made functions of position, not of history:

- the order is DistributedSampler's, a function of (SEED, epoch) and the process's rank; resuming
  after k batches starts that order at sample k * batch size, without reading the k batches;
- each sample's augmentation (RandAugment, random erasing, the random resized crop, the flip) draws
  from generators seeded by (SEED, epoch, rank, position in the epoch), set just before the sample is
  read, so it does not depend on which worker process reads it, on what that worker read before, or
  on the number of workers.

The training process's own generators (drop path, mixup) are saved in the checkpoint. torchdata's
StatefulDataLoader was the alternative: it fast-forwards the sampler by the number of batches yielded,
but leaves the random state of the workers' transforms to the data set (and does not span processes),
so it would need the same per-sample seeding and adds a dependency for nothing more.
"""
import random
from typing import Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, get_worker_info

from engine.seed import derive_seed


class ResumableSampler(DistributedSampler):
    """DistributedSampler yielding (index, seed of that sample); ``set_epoch(epoch, start)`` skips the
    first ``start`` samples of this process's order for the epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0):
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order = list(super().__iter__())
        for position in range(self.start, len(order)):
            yield order[position], derive_seed(self.seed, self.epoch, self.rank, position)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class SeededSamples(Dataset):
    """Reads ``dataset[index]`` for (index, seed) keys with the random generators (torch, numpy,
    random) seeded by ``seed``, and puts the process's generators back afterwards (so that in the
    training process itself, without workers, drop path and mixup keep their own streams). Passes
    batches through the data set's ``__getitems__`` when it has one (see data.robust)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _read(self, key: Tuple[int, int], batched: bool):
        index, seed = key
        if get_worker_info() is not None:  # a loader worker: nothing else draws there, nothing to put back
            self._seed(seed)
            return self.dataset.__getitems__([index])[0] if batched else self.dataset[index]
        # numpy's state alone takes ~0.2 ms to save and restore, as long as the rest of the sample.
        saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        self._seed(seed)
        try:
            return self.dataset.__getitems__([index])[0] if batched else self.dataset[index]
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])

    @staticmethod
    def _seed(seed: int):
        # The CPU generator only: torch.manual_seed would also queue a seed for every accelerator
        # (formatting a stack trace each time, ~0.4 ms a sample) and, with CUDA initialised in the
        # training process, reseed its generator without restoring it.
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def __getitem__(self, key: Tuple[int, int]):
        return self._read(key, batched=False)

    def __getitems__(self, keys) -> list:
        batched = callable(getattr(self.dataset, '__getitems__', None))
        return [self._read(key, batched) for key in keys]
