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
from typing import Dict

import torch
import torch.nn as nn

import faults
import config as config_module
from config import output_dir
from data.robust import report_skipped
from engine import (OptimizerStep, Progress, amp_dtype, append_metrics, drop_metrics_from, make_autocast,
                    make_scaler, match_grad_layout, memory_mb, run_cli, wrap_ddp)
from errors import UserError
from logger import NAME as LOGGER_NAME, create_logger
from lr_scheduler import build_iter_scheduler
from optimizer import build_optimizer
from utils import (all_reduce_sum, auto_resume_file, checkpoint_path, derive_seed, get_rank,
                   get_world_size, init_distributed, is_distributed, load_checkpoint, read_checkpoint,
                   save_checkpoint, seed_everything)

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
    rank = get_rank()
    out = output_dir(config)
    create_logger(out, rank)
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
        source = config.MODEL.RESUME or config.MODEL.PRETRAINED
        if not source:
            raise UserError('--eval needs the weights to evaluate: --resume <checkpoint> or --pretrained <file>')
        load_segmentor_weights(model, source)
        options = inference_options(config, args.aug_test)
        result = evaluate(model, val, device, config, options, autocast)
        report_skipped((val,), 'evaluation', out)
        if rank == 0:
            append_metrics(metrics_path, {'mode': 'eval', 'checkpoint': source, 'miou': result['miou'],
                                          'macc': result['macc'], 'aacc': result['aacc'],
                                          'images': result['images'], 'ratios': options['ratios'],
                                          'flip': options['flip'], 'test_mode': options['mode']})
            logger.info('per-class IoU: ' + ' '.join('-' if v is None else f'{v:.1f}' for v in result['iou']))
        return 0
    return train(config, model, train_set, val, device, dtype, autocast, out, metrics_path, loaders)


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


def _one_backward(model: nn.Module, crop: int, device: torch.device):
    model(torch.zeros(2, 3, crop, crop, device=device)).float().sum().backward()


def train(config, model: Segmentor, train_set, val, device, dtype, autocast, out, metrics_path, loaders) -> int:
    rank, world = get_rank(), get_world_size()
    seg = config.SEG.TRAIN
    resume = config.MODEL.RESUME
    if config.TRAIN.AUTO_RESUME:
        found = auto_resume_file(out, unit='iter')
        if found:
            if resume and os.path.abspath(resume) != os.path.abspath(found):
                logger.warning(f'auto-resume: using {found} instead of {resume}')
            resume = found
    if resume and 'model' not in read_checkpoint(resume, mmap=True):
        raise UserError(f'{resume} is not a training checkpoint of this codebase; to start from released '
                        f'weights use --pretrained')
    if config.MODEL.PRETRAINED and not resume:
        logger.info(load_pretrained(model, config.MODEL.PRETRAINED))
    if is_distributed():
        model = match_grad_layout(model, lambda m: _one_backward(m, config.SEG.AUG.CROP_SIZE, device))
    scale = lr_scale(config, world)
    optimizer = build_optimizer(config, model, scale)
    scheduler = build_iter_scheduler(config, optimizer, scale)
    scaler = make_scaler(device, dtype)
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    logger.info(f'learning rate {config.TRAIN.BASE_LR * scale:.3e} (BASE_LR x {scale:g}: global batch '
                f'{config.DATA.BATCH_SIZE * world * accumulation} / {seg.LR_BATCH})')

    start, best = 0, 0.0
    if resume:
        state = load_checkpoint(resume, model=model, optimizer=optimizer, lr_scheduler=scheduler, scaler=scaler)
        if state['has_training_state']:
            start, best = state['epoch'], state['max_accuracy']
        logger.info(f'resumed from {resume}: continuing at iteration {start}')
    if rank == 0:
        drop_metrics_from(metrics_path, start + 1, key='iter')

    ddp = wrap_ddp(model, device)
    step = OptimizerStep(ddp, model, optimizer, scaler, autocast, accumulation, config.TRAIN.CLIP_GRAD)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(out)
    loader = train_loader(train_set, config.DATA.BATCH_SIZE, start * accumulation, **loaders)
    batches = iter(loader)
    options = inference_options(config, aug_test=False)
    progress = Progress(seg.ITERS, first=start)
    window, interval = LossMeans(), LossMeans()  # since the last log line; since the last evaluation
    logger.info(f'training iterations {start} to {seg.ITERS - 1}')
    model.train()
    for it in range(start, seg.ITERS):
        # Every random draw of step `it` (drop path, dropout) follows from (seed, it, rank), so a
        # resumed run repeats an uninterrupted one; the data draws its own (segmentation/data.py).
        seed_everything(derive_seed(config.SEED, it, rank))
        faults.inject('step', it, rank)
        scheduler.step_update(it)
        for micro in range(accumulation):
            images, (labels, paths) = next(batches)
            check_labels(labels, paths, model.num_classes, config.SEG.REDUCE_ZERO_LABEL)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

            def compute_loss():
                losses = ddp(images, labels)
                window.add(losses)
                interval.add(losses)
                return losses['loss']

            step(compute_loss, micro, accumulation, f'at iteration {it}; the last checkpoint is intact')
        done = it + 1
        if it % config.PRINT_FREQ == 0 or done == seg.ITERS:
            tick = progress.tick(it)
            lr = optimizer.param_groups[0]['lr']
            means = window.pop()
            logger.info(f'Train: [{it}/{seg.ITERS}]  eta {tick["eta"]}  lr {lr:.6e}  time {tick["time"]:.3f}  '
                        + '  '.join(f'{k} {v:.4f}' for k, v in means.items())
                        + f'  grad_norm {step.grad_norm.item():.4f}{memory_mb(device)}')
            if writer is not None:
                for k, v in means.items():
                    writer.add_scalar(f'train/{k}', v, it)
                writer.add_scalar('train/lr', lr, it)
        if done % seg.EVAL_INTERVAL == 0 or done == seg.ITERS:
            train_loss = interval.pop().get('loss', math.nan)
            result = evaluate(model, val, device, config, options, autocast)
            model.train()
            report_skipped((loader, val), f'iteration {done}', out)
            best = max(best, result['miou'])
            if rank == 0:
                append_metrics(metrics_path, {'iter': done, 'train_loss': train_loss, 'miou': result['miou'],
                                              'macc': result['macc'], 'aacc': result['aacc'],
                                              'lr': optimizer.param_groups[0]['lr'], 'max_miou': best})
                for key in ('miou', 'macc', 'aacc'):
                    writer.add_scalar(f'val/{key}', result[key], done)
                writer.flush()
        if rank == 0 and (done % seg.SAVE_INTERVAL == 0 or done == seg.ITERS):
            path = save_checkpoint(checkpoint_path(out, done, 'iter'), model=model, optimizer=optimizer,
                                   lr_scheduler=scheduler, scaler=scaler, epoch=done, max_accuracy=best,
                                   config=config, keep=config.SAVE_KEEP, unit='iter')
            logger.info(f'saved {path}')
    del batches  # stops the loader's workers
    if writer is not None:
        writer.close()
    logger.info(f'done: best mIoU {best:.2f}%')
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))
