"""Learning rates: scaled with the global batch (the same rule in every task), then per-step schedules
from timm: linear warm-up, then cosine, linear or step decay (poly for segmentation).

The schedule counts optimizer steps (micro-batches / accumulation), so ``scheduler.step_update(t)``
sets the rate of step t, and a resumed run needs no scheduler state to continue it.
"""
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler


def global_batch(config, world_size: int) -> int:
    """Images per optimizer step over all processes."""
    return config.DATA.BATCH_SIZE * world_size * max(1, config.TRAIN.ACCUMULATION_STEPS)


def lr_scale(config, world_size: int) -> float:
    """The factor applied to TRAIN.BASE_LR, WARMUP_LR and MIN_LR: those are the rates for a global batch
    of TRAIN.BASE_BATCH_SIZE images, and scale linearly with the actual global batch."""
    return global_batch(config, world_size) / config.TRAIN.BASE_BATCH_SIZE


def describe_lr(config, world_size: int) -> str:
    """The log line that says which rate a run uses and why."""
    scale = lr_scale(config, world_size)
    return (f'learning rate {config.TRAIN.BASE_LR * scale:.3e} (BASE_LR x {scale:g}: global batch '
            f'{global_batch(config, world_size)} / {config.TRAIN.BASE_BATCH_SIZE}, TRAIN.BASE_BATCH_SIZE)')


def build_scheduler(config, optimizer, steps_per_epoch: int, lr_scale: float = 1.0) -> Scheduler:
    """``steps_per_epoch`` counts optimizer steps. The peak rate is the optimizer's (TRAIN.BASE_LR
    scaled); WARMUP_LR and MIN_LR are scaled by the same ``lr_scale``."""
    train = config.TRAIN
    name = train.LR_SCHEDULER.NAME
    total = int(train.EPOCHS * steps_per_epoch)
    warmup = int(train.WARMUP_EPOCHS * steps_per_epoch)
    warmup_lr, min_lr = train.WARMUP_LR * lr_scale, train.MIN_LR * lr_scale
    common = dict(warmup_t=warmup, warmup_lr_init=warmup_lr, warmup_prefix=True, t_in_epochs=False)
    if name == 'cosine':
        return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=min_lr,
                                 cycle_limit=1, **common)
    if name == 'linear':
        # A polynomial decay of power 1 is a straight line from the peak to MIN_LR.
        return PolyLRScheduler(optimizer, t_initial=max(1, total - warmup), power=1.0, lr_min=min_lr,
                               cycle_limit=1, **common)
    if name == 'step':
        return StepLRScheduler(optimizer, decay_t=int(train.LR_SCHEDULER.DECAY_EPOCHS * steps_per_epoch),
                               decay_rate=train.LR_SCHEDULER.DECAY_RATE, **common)
    raise ValueError(f'unknown TRAIN.LR_SCHEDULER.NAME {name!r}; expected cosine, linear or step')


def build_iter_scheduler(config, optimizer, lr_scale: float = 1.0) -> Scheduler:
    """Iteration-based runs (segmentation): linear warm-up over SEG.TRAIN.WARMUP_ITERS from
    TRAIN.WARMUP_LR, and a poly decay of power SEG.TRAIN.POLY_POWER to TRAIN.MIN_LR over all
    SEG.TRAIN.ITERS steps, counted from step 0 as mmcv's poly policy counts (the warm-up ramps to the
    peak rate, where mmcv ramps to the poly value of the step: at most WARMUP_ITERS / ITERS lower)."""
    train, seg = config.TRAIN, config.SEG.TRAIN
    return PolyLRScheduler(optimizer, t_initial=seg.ITERS, power=seg.POLY_POWER, lr_min=train.MIN_LR * lr_scale,
                           warmup_t=seg.WARMUP_ITERS, warmup_lr_init=train.WARMUP_LR * lr_scale,
                           warmup_prefix=False, t_in_epochs=False, cycle_limit=1)
