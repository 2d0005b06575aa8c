"""An epoch-based run's position (classification, detection): the checkpoint after an epoch, one
part-way through an epoch (a stop on a signal, a periodic save) with what resuming there needs, and
whether a resumed run has anything left to do."""
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from data.robust import report_skipped
from errors import UserError
from utils import all_gather_objects, get_rank, get_world_size

from .checkpoint import checkpoint_path, save_on_rank0
from .ddp import wrap_ddp
from .metrics import drop_metrics_from, open_tensorboard
from .preemption import Preemption
from .progress import Progress, memory_mb
from .resume import ResumePoint, resume_or_load
from .seed import derive_seed, rng_state, seed_everything, set_rng_state
from .step import OptimizerStep

logger = logging.getLogger('focalnet')


def batch_layout(config, train_images: int) -> dict:
    """What a mid-epoch position depends on: the same steps must hold the same samples."""
    return {'batch_size': config.DATA.BATCH_SIZE, 'world_size': get_world_size(),
            'accumulation': max(1, config.TRAIN.ACCUMULATION_STEPS), 'train_images': train_images}


def usable_position(position, layout: dict, steps_per_epoch: int, path: str) -> Optional[dict]:
    """The mid-epoch position of a checkpoint, or None (with a warning) when this run splits the
    epoch differently, so that its steps are not the checkpoint's."""
    if position is None:
        return None
    if position['layout'] != layout or position['steps_per_epoch'] != steps_per_epoch:
        logger.warning(f'{path} was saved after step {position["step"]} of epoch {position["epoch"]} with '
                       f'{position["layout"]}; this run has {layout}, so its steps hold other samples: '
                       f'epoch {position["epoch"]} starts again from its first step')
        return None
    return position


def left_to_train(path: str, start_epoch: int, position: Optional[dict], epochs: int) -> bool:
    """Whether a run resumed from ``path`` at ``start_epoch`` has anything left to train; a checkpoint
    beyond TRAIN.EPOCHS is a mistake, not a finished run."""
    if start_epoch > epochs:
        raise UserError(f'{path} has trained {start_epoch} epochs, more than TRAIN.EPOCHS '
                        f'{epochs}; raise TRAIN.EPOCHS to continue it, or give a new '
                        f'run another --output or --tag')
    if start_epoch == epochs and position is None:
        logger.info(f'the run is already complete: {path} ends epoch {start_epoch - 1}, the last '
                    f'of TRAIN.EPOCHS {epochs}; nothing to train (raise TRAIN.EPOCHS '
                    f'to train longer)')
        return False
    return True


class EpochCheckpoints:
    """Writes an epoch-based run's checkpoints: ckpt_epoch_<E>.pth after epoch E, and
    ckpt_epoch_<E>_step_<S>.pth after step S of epoch E (its position: steps done, the running totals
    of the epoch, every process's random generators). ``state``: the save_checkpoint arguments that
    stay the same (model, optimizer, lr_scheduler, scaler, config, ema, ...); ``extra``: entries of
    the task's own. ``best_score``: the best validation score so far, kept up to date by the task;
    ``as_max_accuracy``: also store it under the official checkpoints' name, max_accuracy (whose
    loader reads it)."""

    def __init__(self, out: str, device, layout: dict, *, best_score: float = 0.0, as_max_accuracy: bool = False,
                 extra: Optional[dict] = None, **state):
        self.out, self.device, self.layout = out, device, layout
        self.best_score, self.as_max_accuracy = best_score, as_max_accuracy
        self.extra, self.state = dict(extra or {}), state
        self.preemption = None  # set when the run has one: a save restarts its periodic clock

    def save(self, epoch: int, position: Optional[dict] = None) -> Optional[str]:
        """A checkpoint after ``epoch``, or (``position``) part-way through epoch ``epoch`` + 1; the
        path on rank 0, None on the others (every process calls it)."""
        path = (checkpoint_path(self.out, epoch + 1, step=position['step']) if position
                else checkpoint_path(self.out, epoch))
        extra = dict(self.extra, **({'position': position} if position else {}))
        if self.as_max_accuracy:
            extra['max_accuracy'] = self.best_score
        config = self.state['config']
        return save_on_rank0(path, device=self.device, preemption=self.preemption, epoch=epoch,
                             best_score=self.best_score, keep=config.SAVE_KEEP, extra=extra, **self.state)

    def end_epoch(self, epoch: int) -> bool:
        """At the end of ``epoch``: a checkpoint when SAVE_FREQ or the last epoch asks for one, or when
        a signal came (the run then stops here, saved, whatever SAVE_FREQ says). Whether it saved."""
        config = self.state['config']
        stop, _ = self.preemption.poll()  # the same answer on every process
        saved = stop or epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1
        path = self.save(epoch) if saved else None
        if stop:
            raise self.preemption.stopped(f'after epoch {epoch}', path)
        return saved

    def save_position(self, epoch: int, done: int, num_steps: int, totals: dict) -> Optional[str]:
        """Part-way through ``epoch``, after ``done`` of its ``num_steps`` steps; ``totals``: the
        epoch's running sums (plain numbers)."""
        position = dict(totals, epoch=epoch, step=done, steps_per_epoch=num_steps, layout=self.layout,
                        rng=all_gather_objects(rng_state()))  # every process's generators
        return self.save(epoch - 1, position)


@dataclass
class EpochTrainer:
    """What a training step of an epoch-based run uses; a task's trainer adds its own pieces."""
    config: object
    model: nn.Module               # what the step calls (the DDP wrapper when distributed)
    model_without_ddp: nn.Module   # the bare model: saved, and given to the optimizer
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    optimizer_step: OptimizerStep
    device: torch.device
    writer: Optional[object] = None
    preemption: Optional[Preemption] = None
    # save_position(epoch, steps done, steps per epoch, totals) writes a mid-epoch checkpoint
    save_position: Optional[Callable[[int, int, int, dict], Optional[str]]] = None


def begin_epoch(t: EpochTrainer, epoch: int, num_steps: int, resume: Optional[dict],
                totals: dict) -> Tuple[int, dict, Progress]:
    """Before the first step of ``epoch`` (or of its rest, ``resume``: a mid-epoch position): (the
    first step, the running totals, from ``totals`` or the position's, and the progress clock). The
    model is put in training mode and the rate set as an uninterrupted run leaves it."""
    t.model.train()
    first = resume['step'] if resume else 0
    if resume:
        totals = {k: resume[k] if k in resume else v for k, v in totals.items()}
    if first:  # the rate of the last step taken, as an uninterrupted run leaves it
        accumulation = t.optimizer_step.accumulation
        t.scheduler.step_update(epoch * math.ceil(num_steps / accumulation) + (first - 1) // accumulation)
    t.optimizer.zero_grad(set_to_none=True)
    return first, totals, Progress(num_steps, first)


def after_step(t: EpochTrainer, epoch: int, idx: int, num_steps: int, totals: dict):
    """After micro-batch ``idx``: when it ended an optimizer step, ask whether to stop or save (the
    same answer on every process), write the position reached if so, and stop on a signal."""
    if not (t.optimizer_step.ends_step(idx, num_steps) and t.preemption is not None):
        return
    stop, save = t.preemption.poll()
    path = t.save_position(epoch, idx + 1, num_steps, totals) if save else None
    if stop:
        raise t.preemption.stopped(f'at epoch {epoch} step {idx + 1}/{num_steps}', path)


def report_step(t: EpochTrainer, epoch: int, idx: int, num_steps: int, loss: float, totals: dict,
                progress: Progress, detail: str = ''):
    """After micro-batch ``idx``: the progress line (every PRINT_FREQ steps and by the clock) with the
    loss, its running mean and ``detail``; the loss, rate and gradient norm to TensorBoard every
    PRINT_FREQ steps. Nothing here is exchanged between processes."""
    cfg = t.config
    tick = progress.tick(idx)
    lr, grad_norm = t.optimizer.param_groups[0]['lr'], t.optimizer_step.grad_norm.item()
    if progress.due(idx, cfg.PRINT_FREQ):
        logger.info(f'Train: [{epoch}/{cfg.TRAIN.EPOCHS}][{idx}/{num_steps}]  eta {tick["eta"]}  lr {lr:.6e}  '
                    f'time {tick["time"]:.3f}  loss {loss:.4f} ({totals["loss_sum"] / (idx + 1):.4f})  '
                    + (f'{detail}  ' if detail else '') + f'grad_norm {grad_norm:.4f}{memory_mb(t.device)}')
    if t.writer is not None and (idx % cfg.PRINT_FREQ == 0 or idx + 1 == num_steps):
        global_step = epoch * num_steps + idx
        t.writer.add_scalar('train/loss', loss, global_step)
        t.writer.add_scalar('train/lr', lr, global_step)
        t.writer.add_scalar('train/grad_norm', grad_norm, global_step)


def seed_epoch(loaders, epoch: int, position: Optional[dict], seed: int) -> Optional[dict]:
    """Set the loaders and the random generators for ``epoch``; the mid-epoch position to resume from
    when ``position`` is one of this epoch, else None. Every random draw of an epoch in this process
    (drop path, mixup, image sizes, RoI sampling) follows from (seed, epoch, rank), and each sample's
    augmentation from its position (data/sampler.py), so a resumed run repeats an uninterrupted one."""
    resumed = position if position is not None and position['epoch'] == epoch else None
    rank = get_rank()
    loaders.set_epoch(epoch, resumed['step'] if resumed else 0)
    if resumed:  # the generators as the interrupted run left them, in every process
        set_rng_state(resumed['rng'][rank])
    else:
        seed_everything(derive_seed(seed, epoch, rank))
    return resumed


def resume_epochs(config, out: str, loaders, **load) -> Optional[Tuple[ResumePoint, Optional[dict], dict]]:
    """engine.resume.resume_or_load (``load``: its model, optimizer, scaler, ema and load_weights),
    then where in the epochs the run starts: (what it resumed, the mid-epoch position or None, the
    batch layout), logged; None when the run is already complete. metrics.jsonl loses the records of
    the epochs to be trained again."""
    resumed = resume_or_load(config, out, **load)
    layout = batch_layout(config, len(loaders.train.dataset))
    position = None
    if resumed.path:
        steps = loaders.steps_per_epoch
        if resumed.has_training_state:
            position = usable_position(resumed.entries.get('position'), layout, steps, resumed.path)
        if not left_to_train(resumed.path, resumed.start, position, config.TRAIN.EPOCHS):
            return None
        where = f' step {position["step"]}/{steps}' if position else ''
        logger.info(f'resumed from {resumed.path}: continuing at epoch {resumed.start}{where}')
    if get_rank() == 0:
        drop_metrics_from(os.path.join(out, 'metrics.jsonl'), resumed.start)
    return resumed, position, layout


@contextmanager
def epoch_training(trainer_type, config, out: str, device, loaders, autocast, found, *, model, optimizer,
                   scheduler, scaler, score: str, saved: Optional[dict] = None, as_max_accuracy: bool = False,
                   **task) -> Iterator[Tuple[EpochTrainer, EpochCheckpoints]]:
    """``with epoch_training(...) as (trainer, checkpoints):`` around the epochs of a run: the DDP
    wrapper and the optimizer step, the checkpoints (``saved``: the task's own entries, an EMA model),
    pre-emption and TensorBoard; ``trainer_type(..., **task)`` is the task's trainer. ``found``: what
    :func:`resume_epochs` returned. ``model`` is the bare model; ``score`` names the best score (for
    the last line of the run)."""
    resumed, _, layout = found
    ddp = wrap_ddp(model, device)
    step = OptimizerStep(ddp, model, optimizer, scaler, autocast, max(1, config.TRAIN.ACCUMULATION_STEPS),
                         config.TRAIN.CLIP_GRAD)
    saved = dict(saved or {})
    checkpoints = EpochCheckpoints(out, device, layout, best_score=resumed.best_score, as_max_accuracy=as_max_accuracy,
                                   extra=saved.pop('extra', None), model=model, optimizer=optimizer,
                                   lr_scheduler=scheduler, scaler=scaler, config=config, **saved)

    def save_position(epoch: int, done: int, num_steps: int, totals: dict) -> Optional[str]:
        report_skipped((loaders.train,), f'epoch {epoch} (to step {done})', out)
        return checkpoints.save_position(epoch, done, num_steps, totals)

    logger.info(f'training epochs {resumed.start} to {config.TRAIN.EPOCHS - 1}')
    with Preemption(device, config.SAVE_MINUTES) as preemption, open_tensorboard(out) as writer:
        checkpoints.preemption = preemption
        yield (trainer_type(config, ddp, model, optimizer, scheduler, scaler, step, device, writer, preemption,
                            save_position, **task), checkpoints)
    logger.info(f'done: best {score} {checkpoints.best_score:.2f}')
