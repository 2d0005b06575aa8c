"""The detection learning-rate schedule (mmdetection's, which the official recipes use): linear
warm-up over the first iterations, then a step decay at fixed epochs."""
from timm.scheduler import MultiStepLRScheduler


def build_detection_scheduler(config, optimizer, steps_per_epoch: int,
                              lr_scale: float = 1.0) -> MultiStepLRScheduler:
    """Per optimizer step: from TRAIN.WARMUP_LR (x ``lr_scale``) up to the optimizer's rate over
    DETECTION.WARMUP_ITERS steps, then x TRAIN.LR_SCHEDULER.DECAY_RATE from the first step of each
    epoch in DETECTION.LR_STEPS. ``scheduler.step_update(t)`` sets the rate of step t."""
    d = config.DETECTION
    return MultiStepLRScheduler(
        optimizer, decay_t=[int(epoch) * steps_per_epoch for epoch in d.LR_STEPS],
        decay_rate=config.TRAIN.LR_SCHEDULER.DECAY_RATE, warmup_t=d.WARMUP_ITERS,
        warmup_lr_init=config.TRAIN.WARMUP_LR * lr_scale,
        # The decay epochs count from the start of training, warm-up included (as mmdetection).
        warmup_prefix=False, t_in_epochs=False)
