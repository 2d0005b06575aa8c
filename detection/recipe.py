"""The official configs' training choices that are not part of the model: weight-decay groups and
aspect-ratio grouping of batches.

- Weight decay: the official FocalNet detection configs decay every parameter except those whose
  name contains 'norm', 'absolute_pos_embed' or 'relative_position_bias_table' (mmcv's
  ``paramwise_cfg.custom_keys`` with ``decay_mult=0``, matched as substrings). Biases and layer
  scales are decayed; classification (optimizer.py) spares every one-dimensional parameter.
- Batches: mmdetection's GroupSampler puts only images of one orientation (width > height, or not)
  in a batch, so that padding a batch to its largest image wastes little.
"""
from typing import Iterator, List, Sequence

import torch.nn as nn
from torch.utils.data import Sampler

NO_DECAY_KEYS = ('absolute_pos_embed', 'relative_position_bias_table', 'norm')


def decay_groups(model: nn.Module, weight_decay: float, spare: bool = True) -> List[dict]:
    """[decayed, not decayed] parameter groups as the official configs form them (``spare=False``:
    every parameter decayed, as the Sparse R-CNN config, which has no parameter-wise rule)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    spared = [p for n, p in named if spare and any(k in n for k in NO_DECAY_KEYS)]
    spared_ids = {id(p) for p in spared}
    return [{'params': [p for _, p in named if id(p) not in spared_ids], 'weight_decay': weight_decay},
            {'params': spared, 'weight_decay': 0.0}]


class AspectRatioBatchSampler(Sampler):
    """Batches of ``batch_size`` indices drawn in ``sampler``'s order, each from one group
    (``group_ids[index]``: 1 for landscape images, 0 otherwise): an index waits in its group's
    bucket until the bucket holds a batch. The few left in the buckets at the end fill the last
    batches, mixed; as many batches as ``len(sampler) // batch_size`` (the rest dropped, as
    drop_last). ``set_epoch`` is passed to the sampler."""

    def __init__(self, sampler: Sampler, group_ids: Sequence[int], batch_size: int):
        self.sampler, self.group_ids, self.batch_size = sampler, list(group_ids), batch_size

    def set_epoch(self, epoch: int):
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[List[int]]:
        buckets = {}
        emitted = 0
        for index in self.sampler:
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield list(bucket)
                bucket.clear()
                emitted += 1
        rest = [i for bucket in buckets.values() for i in bucket]
        while emitted < len(self) and len(rest) >= self.batch_size:
            yield rest[:self.batch_size]
            rest = rest[self.batch_size:]
            emitted += 1


def landscape_groups(coco, image_ids: Sequence[int]) -> List[int]:
    """1 where an image (by COCO id) is wider than high, else 0: mmdetection's group flag."""
    return [int(coco.imgs[i]['width'] > coco.imgs[i]['height']) for i in image_ids]
