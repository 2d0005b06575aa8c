"""Train or evaluate UPerNet with a FocalNet backbone on ADE20K (or any data set in its layout).

    python -m segmentation --cfg configs/segmentation/upernet_focalnet_tiny_srf_160k.yaml \
        --data-path <ade> --pretrained focalnet_tiny_srf.pth --output output
    torchrun --nproc_per_node 8 -m segmentation --cfg <cfg> --data-path <ade> --pretrained <imagenet weights>
    python -m segmentation --cfg <cfg> --data-path <ade> --eval --resume <checkpoint> [--aug-test]

Iteration-based: SEG.TRAIN.ITERS optimizer steps, an evaluation every EVAL_INTERVAL and a checkpoint
(ckpt_iter_<N>.pth) every SAVE_INTERVAL steps; a rerun resumes from the newest checkpoint and repeats
what an uninterrupted run would have done.
"""
import argparse
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

import faults
import config as config_module
from config import output_dir
from data.robust import report_skipped
from engine import (OptimizerStep, Preemption, Progress, RunLock, amp_dtype, append_metrics, check_same_config,
                    drop_metrics_from, make_autocast, make_scaler, match_grad_layout, memory_mb, run_cli,
                    tensorboard_writer, wrap_ddp)
from engine.checkpoint import checkpoint_path, save_checkpoint
from engine.folders import ensure_writable_dir
from engine.resume import find_resume_checkpoint, load_checkpoint
from engine.seed import derive_seed, seed_everything
from errors import UserError
from logger import NAME as LOGGER_NAME, create_logger
from lr_scheduler import build_iter_scheduler
from optimizer import build_optimizer
from utils import all_reduce_sum, get_rank, get_world_size, init_distributed, is_distributed

from .checkpoint import load_pretrained, load_segmentor_weights
from .data import ADE20K, check_labels, train_loader, val_loader
from .inference import predict
from .metrics import SegmentationMetric
from .model import Segmentor, build_segmentor
from .transforms import build_train_transform

logger = logging.getLogger(LOGGER_NAME)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser('python -m segmentation', description='UPerNet + FocalNet semantic segmentation')
    p.add_argument('--cfg', metavar='FILE', required=True,
                   help='config file (configs/segmentation/upernet_focalnet_<size>_<srf|lrf>_160k.yaml)')
    p.add_argument('--opts', nargs='+', default=None, metavar='KEY VALUE',
                   help='override config keys: --opts SEG.TRAIN.ITERS 80000 DATA.BATCH_SIZE 4')
    p.add_argument('--data-path', help='data set root: images/{training,validation}, annotations/{...}')
    p.add_argument('--batch-size', type=int, help='images per process and iteration')
    p.add_argument('--pretrained', help='ImageNet weights for the backbone, or a whole segmentor checkpoint')
    p.add_argument('--resume', help='checkpoint to resume from, or to evaluate with --eval (ours or released)')
    p.add_argument('--eval', action='store_true', help='evaluate only')
    p.add_argument('--aug-test', action='store_true',
                   help='multi-scale (SEG.TEST.AUG_RATIOS) and flip testing: the "mIoU (MS)" column')
    p.add_argument('--accumulation-steps', type=int, help='micro-batches per optimizer step')
    p.add_argument('--use-checkpoint', action='store_true', help='gradient checkpointing in the backbone')
    p.add_argument('--amp-opt-level', choices=['O0', 'O1', 'O2'], help='O0 turns mixed precision off')
    p.add_argument('--output', metavar='PATH', help='output root; a run writes <output>/<name>/<tag>')
    p.add_argument('--tag', help='name of the run under the model name')
    # Passed by the legacy torch.distributed.launch; torchrun sets LOCAL_RANK in the environment instead.
    p.add_argument('--local_rank', '--local-rank', type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def get_config(args):
    """Defaults, the config file, --opts, then the named flags (config.get_config); checked and frozen."""
    config = config_module.get_config(args)
    check_config(config)
    return config


def check_config(config):
    seg = config.SEG
    if seg.TEST.MODE not in ('whole', 'slide'):
        raise UserError(f'SEG.TEST.MODE must be whole or slide; got {seg.TEST.MODE!r}')
    for key in ('ITERS', 'EVAL_INTERVAL', 'SAVE_INTERVAL', 'LR_BATCH'):
        if seg.TRAIN[key] < 1:
            raise UserError(f'SEG.TRAIN.{key} must be positive; got {seg.TRAIN[key]}')
    stages = len(config.MODEL.FOCAL.DEPTHS)
    if not 0 <= seg.HEAD.AUX_INDEX < stages:
        raise UserError(f'SEG.HEAD.AUX_INDEX must name a backbone stage, 0..{stages - 1}; got {seg.HEAD.AUX_INDEX}')
    lo, hi = seg.AUG.RATIO_RANGE
    if not 0 < lo <= hi:
        raise UserError(f'SEG.AUG.RATIO_RANGE must be [low, high] with 0 < low <= high; '
                        f'got {list(seg.AUG.RATIO_RANGE)}')
    if config.MODEL.NUM_CLASSES < 2 or config.MODEL.NUM_CLASSES > 255:
        raise UserError(f'MODEL.NUM_CLASSES must be 2..255 (label maps are 8-bit, 255 is ignored); '
                        f'got {config.MODEL.NUM_CLASSES}')
    if seg.TEST.STRIDE < 1 or seg.TEST.CROP_SIZE < 1 or seg.AUG.CROP_SIZE < 1:
        raise UserError('SEG.TEST.STRIDE, SEG.TEST.CROP_SIZE and SEG.AUG.CROP_SIZE must be positive')


def inference_options(config, aug_test: bool) -> dict:
    """The keyword arguments of inference.predict that the config (and --aug-test) select."""
    t = config.SEG.TEST
    return dict(scale=list(t.SCALE), ratios=list(t.AUG_RATIOS if aug_test else t.RATIOS),
                flip=True if aug_test else t.FLIP, mode=t.MODE, crop=t.CROP_SIZE, stride=t.STRIDE)


def lr_scale(config, world_size: int) -> float:
    """Factor applied to TRAIN.BASE_LR, WARMUP_LR and MIN_LR: the global batch per step over SEG.TRAIN.LR_BATCH."""
    return config.DATA.BATCH_SIZE * world_size * max(1, config.TRAIN.ACCUMULATION_STEPS) / config.SEG.TRAIN.LR_BATCH


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate(model: Segmentor, loader, device: torch.device, config, options: dict, autocast) -> Dict:
    """mIoU, mAcc, aAcc (%) and per-class IoU over the whole validation set, all processes."""
    model.eval()
    # Images come in many sizes: cuDNN's per-size search would cost more than it saves.
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        return _evaluate(model, loader, device, config, options, autocast)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _evaluate(model: Segmentor, loader, device: torch.device, config, options: dict, autocast) -> Dict:
    metric = SegmentationMetric(model.num_classes, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    progress = Progress(len(loader))
    for i, (images, (labels, paths)) in enumerate(loader):
        check_labels(labels, paths, model.num_classes, config.SEG.REDUCE_ZERO_LABEL)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        metric.update(predict(model, images, autocast=autocast, **options), labels)
        count += len(images)
        if i % config.PRINT_FREQ == 0 or i + 1 == len(loader):
            tick = progress.tick(i)
            logger.info(f'Test: [{i}/{len(loader)}]  eta {tick["eta"]}  time {tick["time"]:.3f}{memory_mb(device)}')
    result = metric.compute()
    result['images'] = int(all_reduce_sum(count).item())
    logger.info(f' * mIoU {result["miou"]:.2f} mAcc {result["macc"]:.2f} aAcc {result["aacc"]:.2f} '
                f'({result["images"]} images; scales {options["ratios"]}, flip {options["flip"]}, {options["mode"]})')
    return result


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def make_model(config, device: torch.device) -> Segmentor:
    try:
        model = build_segmentor(config)
    except (ValueError, TypeError) as e:
        raise UserError(f'the config does not describe a valid segmentor: {e}') from None
    model = model.to(device)
    if is_distributed() and device.type == 'cuda':
        # Two images per GPU: the heads' batch norms compute their statistics over all processes.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def datasets(config, train: bool):
    d, aug = config.DATA, config.SEG.AUG
    common = dict(reduce_zero_label=config.SEG.REDUCE_ZERO_LABEL, skip_corrupt=d.SKIP_CORRUPT, seed=config.SEED)
    val = ADE20K(d.DATA_PATH, 'val', refill=False, **common)
    if not train:
        return None, val
    transform = build_train_transform(scale=aug.SCALE, ratio_range=aug.RATIO_RANGE, crop_size=aug.CROP_SIZE,
                                      cat_max_ratio=aug.CAT_MAX_RATIO, flip=aug.FLIP, photometric=aug.PHOTOMETRIC)
    return ADE20K(d.DATA_PATH, 'train', transform, **common), val


def run(args) -> int:
    config = get_config(args)
    device = init_distributed(args.local_rank, config.DIST_TIMEOUT)
    check_same_config(config)
    out = output_dir(config)
    if config.EVAL_MODE:  # writes no checkpoints: no lock to hold
        ensure_writable_dir(out)
        return run_in(config, args, device, out)
    # One training run per output folder: taken before anything is written there.
    with RunLock(out) as lock:
        ensure_writable_dir(out)
        return run_in(config, args, device, out, lock.note)


def run_in(config, args, device: torch.device, out: str, note: str = '') -> int:
    rank = get_rank()
    create_logger(out, rank)
    if note:
        logger.warning(note)
    logger.info(f'rank {rank} of {get_world_size()} on {device}')
    if not config.DATA.DATA_PATH:
        raise UserError('no data set: give --data-path <root of images/ and annotations/>')
    train_set, val_set = datasets(config, train=not config.EVAL_MODE)
    if rank == 0:  # an evaluation leaves the training run's config.yaml alone
        with open(os.path.join(out, 'config_eval.yaml' if config.EVAL_MODE else 'config.yaml'), 'w') as f:
            f.write(config.dump())
    logger.info(f'config:\n{config.dump()}')

    seed_everything(config.SEED)  # the same initial weights in every process
    model = make_model(config, device)
    logger.info(f'{config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters')
    dtype = amp_dtype(config, device)
    autocast = make_autocast(device, dtype)
    loaders = dict(num_workers=config.DATA.NUM_WORKERS, skip_corrupt=config.DATA.SKIP_CORRUPT,
                   pin_memory=config.DATA.PIN_MEMORY and device.type == 'cuda')
    val = val_loader(val_set, **loaders)
    metrics_path = os.path.join(out, 'metrics.jsonl')
    if config.EVAL_MODE:
        return run_eval(config, args, model, val, device, autocast, out, metrics_path)
    return train(config, model, train_set, val, device, dtype, autocast, out, metrics_path, loaders)


def run_eval(config, args, model: Segmentor, val, device, autocast, out: str, metrics_path: str) -> int:
    source = config.MODEL.RESUME or config.MODEL.PRETRAINED
    if not source:
        raise UserError('--eval needs the weights to evaluate: --resume <checkpoint> or --pretrained <file>')
    load_segmentor_weights(model, source)
    options = inference_options(config, args.aug_test)
    result = evaluate(model, val, device, config, options, autocast)
    report_skipped((val,), 'evaluation', out)
    if get_rank() == 0:
        append_metrics(metrics_path, {'mode': 'eval', 'checkpoint': source, 'miou': result['miou'],
                                      'macc': result['macc'], 'aacc': result['aacc'],
                                      'images': result['images'], 'ratios': options['ratios'],
                                      'flip': options['flip'], 'test_mode': options['mode']})
        logger.info('per-class IoU: ' + ' '.join('-' if v is None else f'{v:.1f}' for v in result['iou']))
    return 0


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


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
class Trainer:
    """What the iterations share."""
    config: object
    model: Segmentor            # the bare model: evaluated, saved, given to the optimizer
    step: OptimizerStep         # computes through the DDP wrapper when distributed
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


def _one_backward(model: nn.Module, crop: int, device: torch.device):
    model(torch.zeros(2, 3, crop, crop, device=device)).float().sum().backward()


def train(config, model: Segmentor, train_set, val, device, dtype, autocast, out, metrics_path, loaders) -> int:
    rank, world, seg = get_rank(), get_world_size(), config.SEG.TRAIN
    resume, ckpt = config.MODEL.RESUME, None
    if config.TRAIN.AUTO_RESUME:
        found = find_resume_checkpoint(out, unit='iter')
        if found:
            if resume and os.path.abspath(resume) != os.path.abspath(found[0]):
                logger.warning(f'auto-resume: using {found[0]} instead of {resume}')
            resume, ckpt = found
    if config.MODEL.PRETRAINED and not resume:
        logger.info(load_pretrained(model, config.MODEL.PRETRAINED))
    if is_distributed():
        model = match_grad_layout(model, lambda m: _one_backward(m, config.SEG.AUG.CROP_SIZE, device))
    scale = lr_scale(config, world)
    optimizer = build_optimizer(config, model, scale)
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    scaler = make_scaler(device, dtype)
    step = OptimizerStep(wrap_ddp(model, device), model, optimizer, scaler, autocast, accumulation,
                         config.TRAIN.CLIP_GRAD)
    layout = {'batch_size': config.DATA.BATCH_SIZE, 'world_size': world, 'accumulation': accumulation,
              'train_images': len(train_set)}
    t = Trainer(config, model, step, optimizer, build_iter_scheduler(config, optimizer, scale), scaler, device,
                autocast, out, metrics_path, layout)
    logger.info(f'learning rate {config.TRAIN.BASE_LR * scale:.3e} (BASE_LR x {scale:g}: global batch '
                f'{config.DATA.BATCH_SIZE * world * accumulation} / {seg.LR_BATCH})')
    start, evaluated = resume_from(t, resume, ckpt) if resume else (0, True)
    if start == seg.ITERS and evaluated:
        logger.info(f'the run is already complete: {resume} is iteration {start} of SEG.TRAIN.ITERS {seg.ITERS}; '
                    f'nothing to train (raise SEG.TRAIN.ITERS to train longer)')
        return 0
    if rank == 0:
        drop_metrics_from(metrics_path, start + 1, key='iter')
    t.writer = tensorboard_writer(out)
    loader = train_loader(train_set, config.DATA.BATCH_SIZE, start * accumulation, **loaders)
    with Preemption(device, config.SAVE_MINUTES) as t.preemption:
        if not evaluated:  # a stop skipped the evaluation of the checkpoint's iteration
            evaluate_and_record(t, val, start, (loader, val))
        iterate(t, loader, val, start)
    if t.writer is not None:
        t.writer.close()
    logger.info(f'done: best mIoU {t.best:.2f}%')
    return 0


def resume_from(t: Trainer, path: str, ckpt) -> Tuple[int, bool]:
    """Load a training checkpoint; (its iteration, whether that iteration's evaluation was done)."""
    seg = t.config.SEG.TRAIN
    state = load_checkpoint(path, model=t.model, optimizer=t.optimizer, scaler=t.scaler, ckpt=ckpt)
    if not state['has_training_state']:
        logger.info(f'{path} holds weights only: training starts at iteration 0 from them')
        return 0, True
    start, t.best, entries = state['epoch'], state['max_accuracy'], state['entries']
    if start > seg.ITERS:
        raise UserError(f'{path} has trained {start} iterations, more than SEG.TRAIN.ITERS {seg.ITERS}; raise '
                        f'SEG.TRAIN.ITERS to continue it, or give a new run another --output or --tag')
    if entries.get('layout', t.layout) != t.layout:
        logger.warning(f'{path} was trained with {entries["layout"]}; this run has {t.layout}, so its '
                       f'iterations draw other batches than the interrupted run would have')
    t.interval.load(entries.get('loss_means'), t.device)
    if start % seg.SAVE_INTERVAL and start != seg.ITERS:
        t.periodic = path
    logger.info(f'resumed from {path}: continuing at iteration {start}')
    return start, bool(entries.get('evaluated', True))


def iterate(t: Trainer, loader, val, start: int):
    """Iterations ``start`` .. SEG.TRAIN.ITERS - 1, with evaluations, checkpoints and stops."""
    seg = t.config.SEG.TRAIN
    batches = iter(loader)
    progress = Progress(seg.ITERS, first=start)
    logger.info(f'training iterations {start} to {seg.ITERS - 1}')
    t.model.train()
    for it in range(start, seg.ITERS):
        train_iteration(t, batches, it)
        done = it + 1
        if it % t.config.PRINT_FREQ == 0 or done == seg.ITERS:
            log_progress(t, it, progress.tick(it))
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


def train_iteration(t: Trainer, batches, it: int):
    rank = get_rank()
    # Every random draw of step `it` (drop path, dropout) follows from (seed, it, rank), so a resumed
    # run repeats an uninterrupted one; the data draws its own (segmentation/data.py).
    seed_everything(derive_seed(t.config.SEED, it, rank))
    faults.inject('step', it, rank)
    t.scheduler.step_update(it)
    for micro in range(t.step.accumulation):
        images, (labels, paths) = next(batches)
        check_labels(labels, paths, t.model.num_classes, t.config.SEG.REDUCE_ZERO_LABEL)
        images, labels = images.to(t.device, non_blocking=True), labels.to(t.device, non_blocking=True)

        def compute_loss():
            losses = t.step.model(images, labels)
            t.window.add(losses)
            t.interval.add(losses)
            return losses['loss']

        t.step(compute_loss, micro, t.step.accumulation, f'at iteration {it}; the last checkpoint is intact')


def log_progress(t: Trainer, it: int, tick: dict):
    lr = t.optimizer.param_groups[0]['lr']
    means = t.window.pop()
    logger.info(f'Train: [{it}/{t.config.SEG.TRAIN.ITERS}]  eta {tick["eta"]}  lr {lr:.6e}  time {tick["time"]:.3f}  '
                + '  '.join(f'{k} {v:.4f}' for k, v in means.items())
                + f'  grad_norm {t.step.grad_norm.item():.4f}{memory_mb(t.device)}')
    if t.writer is not None:
        for k, v in means.items():
            t.writer.add_scalar(f'train/{k}', v, it)
        t.writer.add_scalar('train/lr', lr, it)


def evaluate_and_record(t: Trainer, val, done: int, loaders):
    train_loss = t.interval.pop().get('loss', math.nan)
    result = evaluate(t.model, val, t.device, t.config, inference_options(t.config, aug_test=False), t.autocast)
    t.model.train()
    report_skipped(loaders, f'iteration {done}', t.out)
    t.best = max(t.best, result['miou'])
    if get_rank() == 0:
        append_metrics(t.metrics_path, {'iter': done, 'train_loss': train_loss, 'miou': result['miou'],
                                        'macc': result['macc'], 'aacc': result['aacc'],
                                        'lr': t.optimizer.param_groups[0]['lr'], 'max_miou': t.best})
        for key in ('miou', 'macc', 'aacc'):
            t.writer.add_scalar(f'val/{key}', result[key], done)
        t.writer.flush()


def save_state(t: Trainer, done: int, evaluated: bool = True) -> Optional[str]:
    """ckpt_iter_<done>.pth, written by rank 0; a checkpoint off SAVE_INTERVAL (a stop, SAVE_MINUTES)
    replaces the previous such one."""
    seg = t.config.SEG.TRAIN
    path, loss_means = None, t.interval.state()
    if get_rank() == 0:
        path = save_checkpoint(checkpoint_path(t.out, done, 'iter'), model=t.model, optimizer=t.optimizer,
                               lr_scheduler=t.scheduler, scaler=t.scaler, epoch=done, max_accuracy=t.best,
                               config=t.config, keep=t.config.SAVE_KEEP, unit='iter',
                               extra={'layout': t.layout, 'loss_means': loss_means, 'evaluated': evaluated})
        logger.info(f'saved {path}')
        if t.periodic and t.periodic != path and os.path.exists(t.periodic):
            os.remove(t.periodic)
        t.periodic = path if done % seg.SAVE_INTERVAL and done != seg.ITERS else None
    all_reduce_sum(torch.zeros(1, device=t.device))  # no process leaves before the file is complete
    t.preemption.saved()
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))
