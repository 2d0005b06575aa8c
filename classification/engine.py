"""The classification loop: one training epoch, validation, and the inference throughput (main.py
connects them to the data, the model and the engine)."""
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import faults
from engine import Progress
from engine.ahead import DeviceBatches
from engine.epochs import EpochTrainer, after_step, begin_epoch, report_step
from errors import UserError
from logger import NAME as LOGGER_NAME
from models.cost import count_flops, count_params
from utils import all_reduce_sum, get_rank

logger = logging.getLogger(LOGGER_NAME)


@dataclass
class ClassificationTrainer(EpochTrainer):
    """The pieces a classification step uses: the engine's, plus the loss, mixup and the EMA."""
    criterion: Optional[Callable] = None
    mixup: Optional[Callable] = None
    ema: Optional[nn.Module] = None


def train_one_epoch(t: ClassificationTrainer, loader, epoch: int, num_steps: int,
                    resume: Optional[dict] = None) -> dict:
    """One epoch of ``num_steps`` micro-batches; ``resume``: the position of a mid-epoch checkpoint of
    this epoch (its steps done and running totals), the loader already set to start after them.
    After every optimizer step, a signal or a due periodic save writes the position reached."""
    accumulation = t.optimizer_step.accumulation
    updates_per_epoch = math.ceil(num_steps / accumulation)
    first, totals, progress = begin_epoch(t, epoch, num_steps, resume,
                                          {'loss_sum': 0.0, 'norm_sum': 0.0, 'updates': 0})
    batches = DeviceBatches(loader, t.device)  # the next batch is moved while the device computes
    for idx, (images, targets) in enumerate(batches, start=first):
        if t.mixup is not None:
            images, targets = t.mixup(images, targets)
        faults.inject('step', epoch * num_steps + idx, get_rank())
        step = epoch * updates_per_epoch + idx // accumulation
        if idx % accumulation == 0:
            t.scheduler.step_update(step)  # the rate of this optimizer step
        loss_value, grad_norm = t.optimizer_step(
            lambda: t.criterion(t.model(images), targets), idx, num_steps,
            f'at epoch {epoch} step {idx}/{num_steps}; the newest checkpoint was written before it',
            while_busy=batches.prepare_next)
        if grad_norm is not None:
            if t.ema is not None:
                t.ema.update(t.model_without_ddp, step=step)
            totals['norm_sum'] += grad_norm.item()
            totals['updates'] += 1
        totals['loss_sum'] += loss_value
        report_step(t, epoch, idx, num_steps, loss_value, totals, progress)
        after_step(t, epoch, idx, num_steps, totals)
    return {'loss': totals['loss_sum'] / num_steps, 'grad_norm': totals['norm_sum'] / max(1, totals['updates']),
            'lr': t.optimizer.param_groups[0]['lr'], 'time_s': time.time() - progress.start}


class NoValidationImages(UserError):
    """Every validation image was skipped: an accuracy of 0% would be a lie."""


@torch.inference_mode()
def validate(model: nn.Module, loader, device: torch.device, autocast=nullcontext,
             name: str = '') -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole validation set, all processes."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    progress = Progress(len(loader))
    for i, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(targets[:, None])
        totals += torch.stack([F.cross_entropy(logits, targets, reduction='sum').double(),
                               hits[:, :1].sum().double(), hits.sum().double(),
                               torch.tensor(float(len(targets)), dtype=torch.float64, device=device)])
        tick = progress.tick(i)
        if progress.due(i):
            logger.info(f'{name} Test: [{i}/{len(loader)}]  eta {tick["eta"]}  time {tick["time"]:.3f}'.lstrip())
    loss, top1, top5, n = all_reduce_sum(totals).tolist()
    if n == 0:  # every image was unreadable and skipped: there is no accuracy to report
        example = next(iter(getattr(loader, 'skipped', {}).items()), None)
        shown = f', for example {example[0]}: {example[1]}' if example else ''
        raise NoValidationImages(f'no validation image could be read: all were skipped as unreadable{shown}')
    result = {'loss': loss / n, 'acc1': 100 * top1 / n, 'acc5': 100 * top5 / n, 'images': int(n)}
    logger.info(f'{name} * Acc@1 {result["acc1"]:.3f} Acc@5 {result["acc5"]:.3f}'.lstrip())
    return result


@torch.inference_mode()
def throughput(model: nn.Module, config, device: torch.device, autocast=nullcontext) -> dict:
    """Images per second of inference on synthetic batches, after a warm-up."""
    model.eval()
    batch, size = config.DATA.BATCH_SIZE, config.DATA.IMG_SIZE
    images = torch.randn(batch, 3, size, size, device=device)
    warmup, timed = (50, 30) if device.type == 'cuda' else (2, 5)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    with autocast():
        for _ in range(warmup):
            model(images)
        sync()
        tic = time.perf_counter()
        for _ in range(timed):
            model(images)
        sync()
    seconds = time.perf_counter() - tic
    result = {'images_per_s': timed * batch / seconds, 'batch_size': batch, 'img_size': size,
              'params': count_params(model), 'gflops': count_flops(model, size) / 1e9}
    logger.info(f'batch_size {batch} throughput {result["images_per_s"]:.1f} images/s '
                f'({timed} batches after {warmup} warm-up, {device.type}, '
                f'params {result["params"] / 1e6:.2f}M, GFLOPs {result["gflops"]:.2f})')
    return result
