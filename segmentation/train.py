"""Train or evaluate UPerNet with a FocalNet backbone on ADE20K (or any data set in its layout).

    python -m segmentation --cfg configs/segmentation/upernet_focalnet_tiny_srf_160k.yaml \
        --data-path <ade> --pretrained focalnet_tiny_srf.pth --output output
    torchrun --nproc_per_node 8 -m segmentation --cfg <cfg> --data-path <ade> --pretrained <imagenet weights>
    python -m segmentation --cfg <cfg> --data-path <ade> --eval --resume <checkpoint> [--aug-test]

Iteration-based: SEG.TRAIN.ITERS optimizer steps, an evaluation every EVAL_INTERVAL and a checkpoint
(ckpt_iter_<N>.pth) every SAVE_INTERVAL steps; a rerun resumes from the newest checkpoint and repeats
what an uninterrupted run would have done. This file parses and connects; the loop is
segmentation/engine.py, and what all tasks share comes from engine/.
"""
import argparse
import logging
import os
from typing import Tuple

import torch
import torch.nn as nn

import config as config_module
from engine import (OptimizerStep, Preemption, drop_metrics_from, match_grad_layout, run_cli,
                    tensorboard_writer, wrap_ddp)
from engine.amp import precision
from engine.cli import add_run_arguments
from engine.metrics import record_evaluation
from engine.resume import ResumePoint, resume_or_load
from engine.run import build_optimization, build_or_explain, settle_config, start_run
from errors import UserError
from logger import NAME as LOGGER_NAME
from lr_scheduler import build_iter_scheduler
from utils import get_rank, get_world_size, is_distributed

from .checkpoint import init_from_pretrained, load_segmentor_weights
from .classes import class_names, per_class_record
from .data import ADE20K, train_loader, val_loader
from .engine import SegmentationTrainer, evaluate, evaluate_and_record, inference_options, iterate
from .model import Segmentor, build_segmentor
from .predict import validation_drawer
from .transforms import build_train_transform

logger = logging.getLogger(LOGGER_NAME)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser('python -m segmentation', description='UPerNet + FocalNet semantic segmentation')
    add_run_arguments(p, cfg_help='config file (configs/segmentation/upernet_focalnet_<size>_<srf|lrf>_160k.yaml); '
                                  'optional with --eval --resume <checkpoint>', cfg_required=False,
                      opts_example='SEG.TRAIN.ITERS 80000 DATA.BATCH_SIZE 4',
                      data_help='data set root: images/{training,validation}, annotations/{...}',
                      pretrained_help='ImageNet weights for the backbone, or a whole segmentor checkpoint')
    p.add_argument('--show-dir', metavar='DIR', help='with --eval: save every validation image with its '
                   'predicted classes laid over it into DIR')
    p.add_argument('--aug-test', action='store_true',
                   help='multi-scale (SEG.TEST.AUG_RATIOS) and flip testing: the "mIoU (MS)" column')
    return p.parse_args(argv)


def get_config(args):
    """Defaults, the config file, --opts, then the named flags (config.get_config); checked and frozen."""
    config = config_module.get_config(args, require_cfg=True)
    check_config(config)
    return config


def check_config(config):
    seg = config.SEG
    if seg.TEST.MODE not in ('whole', 'slide'):
        raise UserError(f'SEG.TEST.MODE must be whole or slide; got {seg.TEST.MODE!r}')
    for key in ('ITERS', 'EVAL_INTERVAL', 'SAVE_INTERVAL'):
        if seg.TRAIN[key] < 1:
            raise UserError(f'SEG.TRAIN.{key} must be positive; got {seg.TRAIN[key]}')
    stages = len(config.MODEL.FOCAL.DEPTHS)
    if not 0 <= seg.HEAD.AUX_INDEX < stages:
        raise UserError(f'SEG.HEAD.AUX_INDEX must name a backbone stage, 0..{stages - 1}; got {seg.HEAD.AUX_INDEX}')
    class_names(config)  # SEG.CLASS_NAMES, when given, names every class
    lo, hi = seg.AUG.RATIO_RANGE
    if not 0 < lo <= hi:
        raise UserError(f'SEG.AUG.RATIO_RANGE must be [low, high] with 0 < low <= high; '
                        f'got {list(seg.AUG.RATIO_RANGE)}')
    if config.MODEL.NUM_CLASSES < 2 or config.MODEL.NUM_CLASSES > 255:
        raise UserError(f'MODEL.NUM_CLASSES must be 2..255 (label maps are 8-bit, 255 is ignored); '
                        f'got {config.MODEL.NUM_CLASSES}')
    if seg.TEST.STRIDE < 1 or seg.TEST.CROP_SIZE < 1 or seg.AUG.CROP_SIZE < 1:
        raise UserError('SEG.TEST.STRIDE, SEG.TEST.CROP_SIZE and SEG.AUG.CROP_SIZE must be positive')


def make_model(config, device: torch.device) -> Segmentor:
    model = build_or_explain(build_segmentor, config, what='segmentor').to(device)
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
    if args.show_dir and not config.EVAL_MODE:
        raise UserError('--show-dir draws the validation images of --eval; add --eval --resume <checkpoint>')
    # An evaluation writes no checkpoints: no lock to hold.
    with start_run(config, args.local_rank, training=not config.EVAL_MODE) as started:
        return run_in(config, args, started.device, started.out)


def run_in(config, args, device: torch.device, out: str) -> int:
    if not config.DATA.DATA_PATH:
        raise UserError('no data set: give --data-path <root of images/ and annotations/>')
    train_set, val_set = datasets(config, train=not config.EVAL_MODE)
    config = settle_config(config, out, config.MODEL.NUM_CLASSES)
    model = make_model(config, device)
    logger.info(f'{config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters')
    dtype, autocast = precision(config, device)
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
    show = validation_drawer(args.show_dir, config) if args.show_dir else None
    result = evaluate(model, val, device, config, options, autocast, show)
    if show is not None:
        logger.info(f'drew {show.show.count} validation images into {args.show_dir}')
    record_evaluation(out, val, source, {'miou': result['miou'], 'macc': result['macc'], 'aacc': result['aacc'],
                                         'images': result['images'], 'ratios': options['ratios'],
                                         'flip': options['flip'], 'test_mode': options['mode'],
                                         **per_class_record(result, class_names(config))})
    return 0


def _one_backward(model: nn.Module, crop: int, device: torch.device):
    model(torch.zeros(2, 3, crop, crop, device=device)).float().sum().backward()


def train(config, model: Segmentor, train_set, val, device, dtype, autocast, out, metrics_path, loaders) -> int:
    """``model`` is the bare segmentor; the DDP wrapper (when distributed) only computes the steps."""
    rank, world, seg = get_rank(), get_world_size(), config.SEG.TRAIN
    if is_distributed():
        model = match_grad_layout(model, lambda m: _one_backward(m, config.SEG.AUG.CROP_SIZE, device))
    optimizer, scheduler, scaler = build_optimization(config, model, device, dtype, lambda opt, scale: (
        build_iter_scheduler(config, opt, scale)))
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    step = OptimizerStep(wrap_ddp(model, device), model, optimizer, scaler, autocast, accumulation,
                         config.TRAIN.CLIP_GRAD)
    layout = {'batch_size': config.DATA.BATCH_SIZE, 'world_size': world, 'accumulation': accumulation,
              'train_images': len(train_set)}
    t = SegmentationTrainer(config, model, step, optimizer, scheduler, scaler, device, autocast, out, metrics_path,
                            layout)
    resumed = resume_or_load(config, out, model=model, optimizer=optimizer, scaler=scaler, unit='iter',
                             load_weights=lambda: logger.info(init_from_pretrained(model, config.MODEL.PRETRAINED)))
    start, evaluated = continue_from(t, resumed)
    if start == seg.ITERS and evaluated:
        logger.info(f'the run is already complete: {resumed.path} is iteration {start} of SEG.TRAIN.ITERS '
                    f'{seg.ITERS}; nothing to train (raise SEG.TRAIN.ITERS to train longer)')
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


def continue_from(t: SegmentationTrainer, resumed: ResumePoint) -> Tuple[int, bool]:
    """(the first iteration, whether the evaluation of the one before was done) of a run that starts
    from ``resumed``; the trainer takes the checkpoint's own entries."""
    seg = t.config.SEG.TRAIN
    if not resumed.has_training_state:
        return 0, True
    start, path, entries = resumed.start, resumed.path, resumed.entries
    t.best = resumed.best_score
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


def main(argv=None) -> int:
    return run_cli(lambda: run(parse_args(argv)))
