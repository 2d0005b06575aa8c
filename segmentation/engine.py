"""The segmentation loop: iterations with their evaluations and checkpoints, and the evaluation
(train.py connects them to the data, the segmentor and the engine)."""
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

import faults
from data.robust import report_skipped
from engine import OptimizerStep, Preemption, Progress, memory_mb, record
from engine.checkpoint import checkpoint_path, save_on_rank0
from engine.seed import derive_seed, seed_everything
from logger import NAME as LOGGER_NAME
from utils import all_reduce_sum, get_rank, get_world_size

from .classes import class_names, per_class_record, per_class_table
from .data import check_labels
from .inference import predict
from .metrics import SegmentationMetric
from .model import Segmentor

logger = logging.getLogger(LOGGER_NAME)


def inference_options(config, aug_test: bool) -> dict:
    """The keyword arguments of inference.predict that the config (and --aug-test) select."""
    t = config.SEG.TEST
    return dict(scale=list(t.SCALE), ratios=list(t.AUG_RATIOS if aug_test else t.RATIOS),
                flip=True if aug_test else t.FLIP, mode=t.MODE, crop=t.CROP_SIZE, stride=t.STRIDE)


@torch.inference_mode()
def evaluate(model: Segmentor, loader, device: torch.device, config, options: dict, autocast, show=None) -> Dict:
    """mIoU, mAcc, aAcc (%) and per-class IoU over the whole validation set, all processes.
    ``show(image, prediction, label_path)``, when given, sees every image (``--show-dir``)."""
    model.eval()
    # Images come in many sizes: cuDNN's per-size search would cost more than it saves.
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        return _evaluate(model, loader, device, config, options, autocast, show)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _evaluate(model: Segmentor, loader, device: torch.device, config, options: dict, autocast, show=None) -> Dict:
    metric = SegmentationMetric(model.num_classes, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    progress = Progress(len(loader))
    for i, (images, (labels, paths)) in enumerate(loader):
        check_labels(labels, paths, model.num_classes, config.SEG.REDUCE_ZERO_LABEL)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        pred = predict(model, images, autocast=autocast, **options)
        metric.update(pred, labels)
        if show is not None:
            for image, p, path in zip(images, pred, paths):
                show(image, p, path)
        count += len(images)
        tick = progress.tick(i)
        if progress.due(i, config.PRINT_FREQ):
            logger.info(f'Test: [{i}/{len(loader)}]  eta {tick["eta"]}  time {tick["time"]:.3f}{memory_mb(device)}')
    result = metric.compute()
    result['images'] = int(all_reduce_sum(count).item())
    logger.info(f' * mIoU {result["miou"]:.2f} mAcc {result["macc"]:.2f} aAcc {result["aacc"]:.2f} '
                f'({result["images"]} images; scales {options["ratios"]}, flip {options["flip"]}, {options["mode"]})')
    logger.info(per_class_table(result, class_names(config)))
    return result


class LossMeans:
    """Running means of the loss terms over micro-batches, averaged over processes when read."""

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, losses: Dict[str, torch.Tensor]):
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
        self.count += 1

    def pop(self) -> Dict[str, float]:
        """The means since the last pop (every process must call it: it reduces)."""
        if not self.count:
            return {}
        keys = list(self.sums)
        totals = all_reduce_sum(torch.stack([self.sums[k] for k in keys])) / (self.count * get_world_size())
        self.sums, self.count = {}, 0
        return dict(zip(keys, totals.tolist()))

    def state(self) -> dict:
        """What a checkpoint keeps (every process must call it: it reduces): the per-process share of
        the summed terms, as plain floats, and the count."""
        keys = list(self.sums)
        shares = all_reduce_sum(torch.stack([self.sums[k] for k in keys])) / get_world_size() if keys else []
        return {'sums': {k: float(v) for k, v in zip(keys, shares)}, 'count': self.count}

    def load(self, state, device: torch.device):
        """Continue from ``state()``; an entry of another form is passed over (the means start afresh)."""
        if (isinstance(state, dict) and isinstance(state.get('count'), int) and isinstance(state.get('sums'), dict)
                and all(isinstance(v, float) for v in state['sums'].values())):
            self.sums = {k: torch.tensor(v, device=device) for k, v in state['sums'].items()}
            self.count = state['count']


@dataclass
class SegmentationTrainer:
    """What the iterations share."""
    config: object
    model_without_ddp: Segmentor  # the bare model: evaluated, saved, given to the optimizer
    step: OptimizerStep           # computes through the DDP wrapper when distributed (step.model)
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    device: torch.device
    autocast: object
    out: str
    metrics_path: str
    layout: dict                # what the iteration -> batch mapping depends on
    preemption: Optional[Preemption] = None
    writer: Optional[object] = None
    best: float = 0.0
    window: LossMeans = field(default_factory=LossMeans)    # since the last log line
    interval: LossMeans = field(default_factory=LossMeans)  # since the last evaluation
    periodic: Optional[str] = None  # the newest checkpoint written off SAVE_INTERVAL, to be replaced


def iterate(t: SegmentationTrainer, loader, val, start: int):
    """Iterations ``start`` .. SEG.TRAIN.ITERS - 1, with evaluations, checkpoints and stops."""
    seg = t.config.SEG.TRAIN
    batches = iter(loader)
    progress = Progress(seg.ITERS, first=start)
    logger.info(f'training iterations {start} to {seg.ITERS - 1}')
    t.model_without_ddp.train()
    for it in range(start, seg.ITERS):
        train_iteration(t, batches, it)
        done = it + 1
        tick = progress.tick(it)
        if progress.due(it, t.config.PRINT_FREQ):
            if it % t.config.PRINT_FREQ == 0 or done == seg.ITERS:  # the means reduce: the same steps everywhere
                log_progress(t, it, tick)
            else:  # a line by the clock of this process: nothing exchanged
                logger.info(f'Train: [{it}/{seg.ITERS}]  eta {tick["eta"]}  time {tick["time"]:.3f}')
        eval_due = done % seg.EVAL_INTERVAL == 0 or done == seg.ITERS
        stop, save = t.preemption.poll()  # the same answer on every process
        evaluated = False
        if eval_due and not stop:
            evaluate_and_record(t, val, done, (loader, val))
            evaluated = True
            stop, save = t.preemption.poll()  # a signal during the evaluation stops here
        path = None
        if stop or save or done % seg.SAVE_INTERVAL == 0 or done == seg.ITERS:
            # A stop before a due evaluation leaves it to the resumed run.
            path = save_state(t, done, evaluated=evaluated or not eval_due)
        if stop:
            raise t.preemption.stopped(f'at iteration {done}', path)


def train_iteration(t: SegmentationTrainer, batches, it: int):
    rank = get_rank()
    # Every random draw of step `it` (drop path, dropout) follows from (seed, it, rank), so a resumed
    # run repeats an uninterrupted one; the data draws its own (segmentation/data.py).
    seed_everything(derive_seed(t.config.SEED, it, rank))
    faults.inject('step', it, rank)
    t.scheduler.step_update(it)
    for micro in range(t.step.accumulation):
        images, (labels, paths) = next(batches)
        check_labels(labels, paths, t.model_without_ddp.num_classes, t.config.SEG.REDUCE_ZERO_LABEL)
        images, labels = images.to(t.device, non_blocking=True), labels.to(t.device, non_blocking=True)

        def compute_loss():
            losses = t.step.model(images, labels)
            t.window.add(losses)
            t.interval.add(losses)
            return losses['loss']

        t.step(compute_loss, micro, t.step.accumulation, f'at iteration {it}; the last checkpoint is intact')


def log_progress(t: SegmentationTrainer, it: int, tick: dict):
    lr = t.optimizer.param_groups[0]['lr']
    means = t.window.pop()
    logger.info(f'Train: [{it}/{t.config.SEG.TRAIN.ITERS}]  eta {tick["eta"]}  lr {lr:.6e}  time {tick["time"]:.3f}  '
                + '  '.join(f'{k} {v:.4f}' for k, v in means.items())
                + f'  grad_norm {t.step.grad_norm.item():.4f}{memory_mb(t.device)}')
    if t.writer is not None:
        for k, v in means.items():
            t.writer.add_scalar(f'train/{k}', v, it)
        t.writer.add_scalar('train/lr', lr, it)


def evaluate_and_record(t: SegmentationTrainer, val, done: int, loaders):
    train_loss = t.interval.pop().get('loss', math.nan)
    options = inference_options(t.config, aug_test=False)
    result = evaluate(t.model_without_ddp, val, t.device, t.config, options, t.autocast)
    t.model_without_ddp.train()
    report_skipped(loaders, f'iteration {done}', t.out)
    t.best = max(t.best, result['miou'])
    values = {'iter': done, 'train_loss': train_loss, 'miou': result['miou'], 'macc': result['macc'],
              'aacc': result['aacc'], 'lr': t.optimizer.param_groups[0]['lr'], 'max_miou': t.best,
              **per_class_record(result, class_names(t.config))}
    record(t.out, values, t.writer, done, ('miou', 'macc', 'aacc'), prefix='val')


def save_state(t: SegmentationTrainer, done: int, evaluated: bool = True) -> Optional[str]:
    """ckpt_iter_<done>.pth, written by rank 0; a checkpoint off SAVE_INTERVAL (a stop, SAVE_MINUTES)
    replaces the previous such one."""
    seg = t.config.SEG.TRAIN
    loss_means = t.interval.state()  # every process: it reduces
    path = save_on_rank0(checkpoint_path(t.out, done, 'iter'), device=t.device, preemption=t.preemption,
                         model=t.model_without_ddp, optimizer=t.optimizer, lr_scheduler=t.scheduler,
                         scaler=t.scaler, epoch=done, best_score=t.best, config=t.config,
                         keep=t.config.SAVE_KEEP, unit='iter',
                         extra={'layout': t.layout, 'loss_means': loss_means, 'evaluated': evaluated})
    if get_rank() == 0:
        if t.periodic and t.periodic != path and os.path.exists(t.periodic):
            os.remove(t.periodic)
        t.periodic = path if done % seg.SAVE_INTERVAL and done != seg.ITERS else None
    return path
