"""Train or evaluate a torchvision detector on the FocalNet dense backbone, on COCO-layout data.

    python -m detection --cfg configs/detection/mask_rcnn_focalnet_tiny_srf_1x.yaml --data-path <coco> \
        --pretrained focalnet_tiny_srf.pth --output output
    torchrun --nproc_per_node 8 -m detection --cfg ... --data-path <coco> --pretrained ...
    python -m detection --cfg ... --data-path <coco> --eval --resume <checkpoint>

The pieces shared with classification (AMP, the optimizer step, checkpoints, auto-resume,
metrics.jsonl, progress, the one-line errors) come from engine/.
"""
import argparse
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

import faults
from config import get_config, output_dir, with_num_classes
from data.robust import report_skipped
from engine import (OptimizerStep, Progress, amp_dtype, append_metrics, drop_metrics_from,
                    make_autocast, make_scaler, match_grad_layout, memory_mb, run_cli, tensorboard_writer,
                    wrap_ddp)
from engine.checkpoint import checkpoint_path, save_checkpoint
from engine.resume import auto_resume_file, load_checkpoint
from engine.seed import derive_seed, seed_everything
from errors import UserError
from logger import NAME as LOGGER_NAME, create_logger
from models import init_from_classification, load_dense_checkpoint
from models.cost import count_params
from models.pretrained import extract_state_dict, read_state_file
from optimizer import build_optimizer
from utils import get_rank, get_world_size, init_distributed, is_distributed

from .category_ap import per_class_record, per_class_table
from .checkpoint import describe, is_released_detector, is_released_file, load_released_detector
from .data import build_detection_loaders
from .evaluation import evaluate
from .model import METHODS, RELEASED_LOADABLE, build_detector, dense_backbone, has_masks
from .predict import validation_drawer
from .recipe import decay_groups
from .released import is_released_detector as is_whole_released, load_released
from .schedule import build_detection_scheduler

logger = logging.getLogger(LOGGER_NAME)

# What metrics.jsonl records of an evaluation (percent), and the score that picks the best epoch.
RECORDED = ('bbox_ap', 'bbox_ap50', 'bbox_ap75', 'segm_ap', 'segm_ap50', 'segm_ap75')
BEST = 'bbox_ap'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser('python -m detection',
                                     description='FocalNet detectors on COCO-layout data')
    parser.add_argument('--cfg', metavar='FILE', required=True,
                        help='config file (configs/detection/<method>_focalnet_<size>_<srf|lrf>_<1x|3x>.yaml)')
    parser.add_argument('--opts', nargs='+', default=None, metavar='KEY VALUE',
                        help='override config keys: --opts MODEL.FOCAL.EMBED_DIM 32 TRAIN.EPOCHS 2')
    parser.add_argument('--data-path', help='COCO root: annotations/instances_<split>.json, <split>/')
    parser.add_argument('--batch-size', type=int, help='images per process and step')
    parser.add_argument('--resume', help='checkpoint to resume from, or to evaluate with --eval')
    parser.add_argument('--pretrained', help='backbone weights to start from: ImageNet classification '
                        'weights (official, timm or HF layout) or an official detection checkpoint')
    parser.add_argument('--accumulation-steps', type=int, help='micro-batches per optimizer step')
    parser.add_argument('--use-checkpoint', action='store_true', help='gradient checkpointing')
    parser.add_argument('--amp-opt-level', choices=['O0', 'O1', 'O2'],
                        help='O0 turns mixed precision off; O1 and O2 both use torch.amp')
    parser.add_argument('--output', metavar='PATH', help='output root; a run writes <output>/<name>/<tag>')
    parser.add_argument('--tag', help='name of the run under the model name')
    parser.add_argument('--eval', action='store_true', help='evaluate a checkpoint (--resume) only')
    parser.add_argument('--show-dir', metavar='DIR', help='with --eval: save every validation image with '
                        'its detections drawn into DIR')
    # Passed by the legacy torch.distributed.launch; torchrun sets LOCAL_RANK in the environment.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_detection_config(config):
    """Values of the DETECTION group that no detector could run with, as one-line errors."""
    d = config.DETECTION
    if d.METHOD not in METHODS:
        raise UserError(f'DETECTION.METHOD must be one of {", ".join(METHODS)}; got {d.METHOD!r}')
    if not len(d.MIN_SIZE_TRAIN) or min(d.MIN_SIZE_TRAIN) < 1 or d.MIN_SIZE_TEST < 1 or d.MAX_SIZE < 1:
        raise UserError(f'DETECTION.MIN_SIZE_TRAIN, MIN_SIZE_TEST and MAX_SIZE must be positive sizes; '
                        f'got {list(d.MIN_SIZE_TRAIN)}, {d.MIN_SIZE_TEST}, {d.MAX_SIZE}')
    if len(d.CROP_RESIZE) and (len(d.CROP_SIZE) != 2 or not 0 < d.CROP_SIZE[0] <= d.CROP_SIZE[1]):
        raise UserError(f'DETECTION.CROP_SIZE must be [min, max] with 0 < min <= max; got {list(d.CROP_SIZE)}')
    steps = list(d.LR_STEPS)
    if steps != sorted(steps) or any(not 0 < s < config.TRAIN.EPOCHS for s in steps):
        raise UserError(f'DETECTION.LR_STEPS must be increasing epochs between 1 and TRAIN.EPOCHS - 1 '
                        f'({config.TRAIN.EPOCHS - 1}); got {steps}')
    if d.DECAY_GROUPS not in ('official', 'classification', 'all'):
        raise UserError(f'DETECTION.DECAY_GROUPS must be official, classification or all; got {d.DECAY_GROUPS!r}')
    if config.TRAIN.EMA.ENABLED:
        raise UserError('TRAIN.EMA.ENABLED: python -m detection keeps no weight EMA; set it False')
    if d.METHOD == 'fcos' and d.FPN_CHANNELS % 32:
        raise UserError(f'DETECTION.FPN_CHANNELS must be a multiple of 32 for fcos (its heads use group '
                        f'norm with 32 groups); got {d.FPN_CHANNELS}')
    for key in ('FPN_CHANNELS', 'BOX_HEAD_DIM', 'MASK_HEAD_DIM', 'RPN_BATCH_SIZE', 'ROI_BATCH_SIZE',
                'BASE_BATCH', 'EVAL_FREQ', 'DETECTIONS_PER_IMAGE'):
        if d[key] < 1:
            raise UserError(f'DETECTION.{key} must be positive; got {d[key]}')


def lr_scale(config, world_size: int) -> float:
    """TRAIN.BASE_LR holds for a global batch of DETECTION.BASE_BATCH images; linear in the batch."""
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    return config.DATA.BATCH_SIZE * world_size * accumulation / config.DETECTION.BASE_BATCH


def load_backbone_weights(model: nn.Module, path: str, category_names=None):
    """ImageNet classification weights, or the backbone of an official detection checkpoint
    (recognised by its ``backbone.*`` keys), into the detector's FocalNet; a whole released Mask
    R-CNN / Faster R-CNN (its RPN and RoI heads too) into the whole detector. The report is logged."""
    body = dense_backbone(model)
    state = extract_state_dict(read_state_file(path, 'cpu', mmap=True), path)
    if hasattr(model, 'released_keys') and is_whole_released(state):
        load_whole_detector(model, path, state)
        return
    if is_released_detector(state):
        logger.info(describe(load_released_detector(model, path, category_names)))
        return
    if any(k.startswith('backbone.') for k in state):
        report = load_dense_checkpoint(body, state)
        dropped = ', '.join(f'{n} {k}' for k, n in report['dropped'].items()) or 'nothing'
        logger.info(f'{path}: loaded the backbone ({report["num_tensors"]} tensors) of a dense '
                    f'checkpoint; not loaded: {dropped}')
        return
    report = init_from_classification(body, state)
    logger.info(f'{path}: backbone initialised from {report["layout"]}-layout classification weights; '
                f'{len(report["padded"])} kernels centre-padded, {len(report["expanded"])} gate tensors '
                f'expanded; kept at init (not in the file): {report["added"] or "none"}; '
                f'not used: {report["dropped"] or "none"}')


def load_whole_detector(model: nn.Module, path: str, state: Optional[dict] = None):
    """A released mmdetection checkpoint, every tensor through the model's key table, strictly."""
    if state is None:
        state = extract_state_dict(read_state_file(path, 'cpu', mmap=True), path)
    if not is_whole_released(state):
        raise UserError(f'{path} is not a whole released detector (it needs backbone.* and the neck and '
                        f'head keys); --eval --pretrained evaluates one')
    report = load_released(model, state, model.released_keys, path)
    logger.info(f'{path}: loaded the whole released detector ({report["num_tensors"]} tensors)')


def make_detector(config, num_classes: int) -> nn.Module:
    try:
        return build_detector(config, num_classes)
    except (ValueError, TypeError) as e:
        raise UserError(f'the config does not describe a valid detector: {e}') from None


def _to(target: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in target.items()}


@dataclass
class Trainer:
    config: object
    model: nn.Module            # what the step calls (the DDP wrapper when distributed)
    module: nn.Module           # the bare detector: saved, and given to the optimizer
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    optimizer_step: OptimizerStep
    device: torch.device
    writer: Optional[object] = None


def train_one_epoch(t: Trainer, loader, epoch: int) -> Dict[str, float]:
    """One epoch; the mean total loss and mean of each of the detector's losses."""
    cfg = t.config
    t.model.train()
    num_steps = len(loader)
    updates_per_epoch = math.ceil(num_steps / t.optimizer_step.accumulation)
    sums: Dict[str, float] = {}
    progress = Progress(num_steps)
    t.optimizer.zero_grad(set_to_none=True)
    for idx, (images, targets) in enumerate(loader):
        images = [image.to(t.device, non_blocking=True) for image in images]
        targets = [_to(target, t.device) for target in targets]
        faults.inject('step', epoch * num_steps + idx, get_rank())
        if idx % t.optimizer_step.accumulation == 0:
            t.scheduler.step_update(epoch * updates_per_epoch + idx // t.optimizer_step.accumulation)
        parts: Dict[str, torch.Tensor] = {}

        def compute_loss() -> torch.Tensor:
            parts.update(t.model(images, targets))  # torchvision returns its losses in training
            return sum(parts.values())

        loss, _ = t.optimizer_step(compute_loss, idx, num_steps,
                                   f'at epoch {epoch} step {idx}/{num_steps}; nothing was saved for this epoch')
        for name, value in [('loss', loss)] + [(k, v.item()) for k, v in parts.items()]:
            sums[name] = sums.get(name, 0.0) + value
        tick = progress.tick(idx)
        if idx % cfg.PRINT_FREQ == 0 or idx + 1 == num_steps:
            lr = t.optimizer.param_groups[0]['lr']
            detail = '  '.join(f'{k} {v.item():.4f}' for k, v in parts.items())
            logger.info(f'Train: [{epoch}/{cfg.TRAIN.EPOCHS}][{idx}/{num_steps}]  eta {tick["eta"]}  '
                        f'lr {lr:.6e}  time {tick["time"]:.3f}  loss {loss:.4f} '
                        f'({sums["loss"] / (idx + 1):.4f})  {detail}  '
                        f'grad_norm {t.optimizer_step.grad_norm.item():.4f}{memory_mb(t.device)}')
            if t.writer is not None:
                step = epoch * num_steps + idx
                t.writer.add_scalar('train/loss', loss, step)
                t.writer.add_scalar('train/lr', lr, step)
    means = {k: v / num_steps for k, v in sums.items()}
    means['lr'] = t.optimizer.param_groups[0]['lr']
    means['time_s'] = time.time() - progress.start
    return means


def run_evaluation(config, model, loaders, device, autocast, show=None) -> dict:
    iou_types = ('bbox', 'segm') if has_masks(config.DETECTION.METHOD) else ('bbox',)
    metrics = evaluate(model, loaders.val, device, autocast, loaders.val_coco,
                       loaders.label_to_category, iou_types, show)
    if metrics.get('summary'):
        logger.info('COCO evaluation:\n' + metrics['summary'])
    shown = '  '.join(f'{k} {metrics[k]:.2f}' for k in RECORDED if metrics.get(k) is not None)
    logger.info(f' * {shown}  ({metrics["images"]} images, {metrics["detections"]} detections)')
    logger.info(per_class_table(metrics, loaders.category_names))
    return metrics


def _check_categories(state: dict, loaders, path: str):
    saved = state['entries'].get('categories')
    if saved is not None and list(saved) != list(loaders.label_to_category):
        raise UserError(f'checkpoint {path} was trained on category ids {list(saved)}, but the data '
                        f'has {list(loaders.label_to_category)}')


def run(args) -> int:
    config = get_config(args)
    check_detection_config(config)
    if config.EVAL_MODE and not (config.MODEL.RESUME or config.MODEL.PRETRAINED):
        raise UserError('--eval needs the detector to evaluate: --resume <checkpoint> (or --pretrained '
                        '<released mmdetection checkpoint>)')
    if args.show_dir and not config.EVAL_MODE:
        raise UserError('--show-dir draws the validation images of --eval; add --eval --resume <checkpoint>')
    device = init_distributed(args.local_rank, config.DIST_TIMEOUT)
    rank = get_rank()
    out = output_dir(config)
    create_logger(out, rank)
    logger.info(f'rank {rank} of {get_world_size()} on {device}')
    method = config.DETECTION.METHOD
    loaders = build_detection_loaders(config, train=not config.EVAL_MODE, with_masks=has_masks(method))
    if loaders.num_classes != config.MODEL.NUM_CLASSES:
        logger.info(f'MODEL.NUM_CLASSES: {loaders.num_classes} (the categories of the annotations: '
                    f'{", ".join(loaders.category_names[:10])}{" ..." if loaders.num_classes > 10 else ""})')
    config = with_num_classes(config, loaders.num_classes)
    if rank == 0:
        with open(os.path.join(out, 'config_eval.yaml' if config.EVAL_MODE else 'config.yaml'), 'w') as f:
            f.write(config.dump())
    logger.info(f'config:\n{config.dump()}')

    seed_everything(config.SEED)  # the same initial weights in every process
    model = make_detector(config, loaders.num_classes).to(device)
    logger.info(f'{method} on FocalNet: {count_params(model) / 1e6:.2f}M parameters '
                f'(backbone {count_params(dense_backbone(model)) / 1e6:.2f}M)')
    dtype = amp_dtype(config, device)
    autocast = make_autocast(device, dtype)
    metrics_path = os.path.join(out, 'metrics.jsonl')

    if config.EVAL_MODE:
        source = config.MODEL.RESUME or config.MODEL.PRETRAINED
        released = not config.MODEL.RESUME or is_released_file(source)
        if hasattr(model, 'released_keys') and released:
            load_whole_detector(model, source)  # ATSS, Cascade: a released detector, whole and strictly
        elif is_released_file(source):
            logger.info(describe(load_released_detector(model, source, loaders.category_names)))
        elif not config.MODEL.RESUME:
            raise UserError(f'--eval --pretrained {source}: not a released mmdetection detector '
                            f'checkpoint (no neck and heads); evaluate a whole detector')
        else:
            state = load_checkpoint(config.MODEL.RESUME, model=model)
            _check_categories(state, loaders, config.MODEL.RESUME)
        show = validation_drawer(args.show_dir, loaders.val_coco, loaders.category_names) if args.show_dir else None
        metrics = run_evaluation(config, model, loaders, device, autocast, show)
        if show is not None:
            logger.info(f'drew {show.show.count} validation images into {args.show_dir}')
        report_skipped((loaders.val,), 'evaluation', out)
        if rank == 0:
            append_metrics(metrics_path, {'mode': 'eval', 'checkpoint': source, 'model': config.MODEL.NAME,
                                          'released': released,
                                          **{k: metrics.get(k) for k in RECORDED if k in metrics},
                                          'images': metrics['images'],
                                          **per_class_record(metrics, loaders.category_names)})
        return 0
    return train(config, loaders, model, device, autocast, dtype, out, metrics_path)


def train(config, loaders, model, device, autocast, dtype, out, metrics_path) -> int:
    rank = get_rank()
    resume = config.MODEL.RESUME
    if config.TRAIN.AUTO_RESUME:
        found = auto_resume_file(out)
        if found:
            if resume and os.path.abspath(resume) != os.path.abspath(found):
                logger.warning(f'auto-resume: using {found} instead of {resume}')
            resume = found
    if config.MODEL.PRETRAINED and not resume:
        load_backbone_weights(model, config.MODEL.PRETRAINED, loaders.category_names)
    if is_distributed():
        body = dense_backbone(model)
        match_grad_layout(body, lambda m: sum(o.float().sum() for o in m(
            torch.zeros(2, 3, 64, 64, device=device))).backward())
    scale = lr_scale(config, get_world_size())
    groups = None
    if config.DETECTION.DECAY_GROUPS in ('official', 'all'):
        groups = decay_groups(model, config.TRAIN.WEIGHT_DECAY, spare=config.DETECTION.DECAY_GROUPS == 'official')
    optimizer = build_optimizer(config, model, scale, groups)
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    scheduler = build_detection_scheduler(config, optimizer, math.ceil(len(loaders.train) / accumulation), scale)
    scaler = make_scaler(device, dtype)
    logger.info(f'learning rate {config.TRAIN.BASE_LR * scale:.3e} (BASE_LR x {scale:g}: global batch '
                f'{config.DATA.BATCH_SIZE * get_world_size() * accumulation} / {config.DETECTION.BASE_BATCH})')

    start_epoch, best = 0, 0.0
    if resume:
        state = load_checkpoint(resume, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                scaler=scaler)
        _check_categories(state, loaders, resume)
        if state['has_training_state']:
            start_epoch, best = state['epoch'] + 1, state['max_accuracy']
        logger.info(f'resumed from {resume}: continuing at epoch {start_epoch}')
    if rank == 0:
        drop_metrics_from(metrics_path, start_epoch)

    ddp = wrap_ddp(model, device)
    writer = tensorboard_writer(out)
    step = OptimizerStep(ddp, model, optimizer, scaler, autocast, accumulation, config.TRAIN.CLIP_GRAD)
    trainer = Trainer(config, ddp, model, optimizer, scheduler, scaler, step, device, writer)

    epochs = config.TRAIN.EPOCHS
    logger.info(f'training epochs {start_epoch} to {epochs - 1}')
    for epoch in range(start_epoch, epochs):
        loaders.set_epoch(epoch)
        # Every random draw of the epoch (augmentation, image sizes, RoI sampling, drop path) follows
        # from (seed, epoch, rank), so a resumed run repeats an uninterrupted one.
        seed_everything(derive_seed(config.SEED, epoch, rank))
        stats = train_one_epoch(trainer, loaders.train, epoch)
        record = {'epoch': epoch, 'train_loss': stats['loss'], 'lr': stats['lr'],
                  'epoch_time_s': stats['time_s'],
                  **{k: v for k, v in stats.items() if k.startswith('loss_')}}
        if (epoch + 1) % config.DETECTION.EVAL_FREQ == 0 or epoch == epochs - 1:
            metrics = run_evaluation(config, model, loaders, device, autocast)
            record.update({k: metrics[k] for k in RECORDED if k in metrics})
            record.update(per_class_record(metrics, loaders.category_names))
            best = max(best, metrics.get(BEST) or 0.0)
            record[f'best_{BEST}'] = best
        report_skipped((loaders.train, loaders.val), f'epoch {epoch}', out)
        logger.info(f'epoch {epoch}: train loss {stats["loss"]:.4f}, {stats["time_s"]:.0f}s'
                    + (f', {BEST} {record[BEST]:.2f} (best {best:.2f})' if BEST in record else ''))
        if rank == 0:
            append_metrics(metrics_path, record)
            for key in ('train_loss',) + RECORDED:
                if record.get(key) is not None:
                    writer.add_scalar(f'epoch/{key}', record[key], epoch)
            writer.flush()
            if epoch % config.SAVE_FREQ == 0 or epoch == epochs - 1:
                path = save_checkpoint(checkpoint_path(out, epoch), model=model, optimizer=optimizer,
                                       lr_scheduler=scheduler, scaler=scaler, epoch=epoch,
                                       max_accuracy=best, config=config, keep=config.SAVE_KEEP,
                                       extra={'categories': list(loaders.label_to_category),
                                              'category_names': list(loaders.category_names)})
                logger.info(f'saved {path}')
    if writer is not None:
        writer.close()
    logger.info(f'done: best {BEST} {best:.2f}')
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))
