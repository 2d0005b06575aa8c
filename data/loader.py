"""Loaders for training and validation, sharded over the processes of a distributed run."""
from dataclasses import dataclass
from typing import Optional

import torch
from timm.data import Mixup
from torch.utils.data import DataLoader, Dataset

from engine.seed import derive_seed, seed_worker
from errors import UserError
from utils import get_rank, get_world_size

from .datasets import build_dataset
from .robust import SkipReportingLoader, collate_with_problems
from .sampler import ResumableSampler, SeededSamples
from .transforms import build_train_transform, build_transform
from .workers import worker_count


@dataclass
class Loaders:
    """What build_loader learns: the loaders, the number of classes, and mixup (None when off)."""
    train: Optional[DataLoader]
    val: DataLoader
    num_classes: int
    mixup: Optional[Mixup]
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        """Training batches of a whole epoch (the loader's length shrinks in a resumed epoch)."""
        return self.train.sampler.num_samples // self.train.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0):
        """Reshuffle for ``epoch``, starting after its first ``start_step`` batches (a run resumed part-way
        through it), and reseed the loader's workers from (seed, epoch, rank)."""
        if self.train is not None:
            self.train.sampler.set_epoch(epoch, start_step * self.train.batch_size)
            self.train.generator.manual_seed(derive_seed(self.seed, epoch, get_rank()))


def build_mixup(config, num_classes: int) -> Optional[Mixup]:
    aug = config.AUG
    if not (aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None):
        return None
    if config.DATA.BATCH_SIZE % 2:
        raise UserError(f'mixup and cutmix need an even DATA.BATCH_SIZE; got {config.DATA.BATCH_SIZE} '
                        f'(or turn them off with --opts AUG.MIXUP 0 AUG.CUTMIX 0)')
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=num_classes)


def _val_loader(config, dataset: Dataset) -> DataLoader:
    # Each process takes every world_size-th image, without the padding DistributedSampler adds, so
    # the summed counts over processes cover each image exactly once.
    indices = list(range(get_rank(), len(dataset), get_world_size()))
    return SkipReportingLoader(DataLoader(
        dataset, batch_size=config.DATA.BATCH_SIZE, sampler=indices,
        num_workers=_workers(config), pin_memory=_pin(config), drop_last=False,
        worker_init_fn=seed_worker, collate_fn=collate_with_problems), config.DATA.SKIP_CORRUPT)


def _workers(config) -> int:
    return worker_count(config.DATA.NUM_WORKERS)


def _pin(config) -> bool:
    return config.DATA.PIN_MEMORY and torch.cuda.is_available()


def build_loader(config, train: bool = True) -> Loaders:
    """Validation loader, and the training loader unless ``train`` is False (evaluation only)."""
    train_loader = train_set = None
    if train:
        train_set, num_classes = build_dataset('train', config, build_train_transform(config))
    # The validation folder's classes must be among the training set's and keep their indices.
    val_set, val_classes = build_dataset('val', config, build_transform(False, config),
                                         class_to_idx=getattr(train_set, 'class_to_idx', None))
    if train_set is None:
        num_classes = val_classes
    elif val_classes > num_classes:
        raise UserError(f'the validation set has class indices up to {val_classes - 1}, but the training '
                        f'set only {num_classes} classes')
    if train:
        world = get_world_size()
        if len(train_set) < config.DATA.BATCH_SIZE * world:
            raise UserError(f'the training set has {len(train_set)} images, fewer than one global batch '
                            f'({config.DATA.BATCH_SIZE} x {world} processes); lower --batch-size')
        # Each sample is augmented from a seed of its own position in the epoch (data/sampler.py), so
        # a run resumed part-way through an epoch repeats the uninterrupted one exactly.
        sampler = ResumableSampler(train_set, num_replicas=world, rank=get_rank(), seed=config.SEED)
        train_loader = SkipReportingLoader(DataLoader(
            SeededSamples(train_set), batch_size=config.DATA.BATCH_SIZE, sampler=sampler,
            num_workers=_workers(config), pin_memory=_pin(config), drop_last=True,
            worker_init_fn=seed_worker, generator=torch.Generator(),
            # No sample's randomness depends on a worker's history, so workers can live on across
            # epochs instead of starting afresh every epoch.
            persistent_workers=_workers(config) > 0, collate_fn=collate_with_problems),
            config.DATA.SKIP_CORRUPT)
    return Loaders(train=train_loader, val=_val_loader(config, val_set), num_classes=num_classes,
                   mixup=build_mixup(config, num_classes) if train else None, seed=config.SEED)
