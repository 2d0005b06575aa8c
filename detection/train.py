"""Train or evaluate a torchvision detector on the FocalNet dense backbone, on COCO-layout data.

    python -m detection --cfg configs/detection/mask_rcnn_focalnet_tiny_srf_1x.yaml --data-path <coco> \
        --pretrained focalnet_tiny_srf.pth --output output
    torchrun --nproc_per_node 8 -m detection --cfg ... --data-path <coco> --pretrained ...
    python -m detection --data-path <coco> --eval --resume <checkpoint>

This file parses and connects; the loop is detection/engine.py. What all tasks share (run start, the
output-folder lock, pre-emption, resume, checkpoints, the optimizer step, learning-rate scaling,
metrics.jsonl, progress, the one-line errors) comes from engine/.
"""
import argparse
import logging
import math
from typing import Optional

import torch
import torch.nn as nn

from config import get_config
from data.robust import report_skipped
from engine import match_grad_layout, run_cli
from engine.amp import precision
from engine.cli import add_run_arguments
from engine.epochs import epoch_training, resume_epochs, seed_epoch
from engine.metrics import record, record_evaluation
from engine.resume import load_checkpoint
from engine.run import build_optimization, build_or_explain, settle_config, start_run
from errors import UserError
from logger import NAME as LOGGER_NAME
from models import init_from_classification, load_dense_checkpoint
from models.cost import count_params
from models.pretrained import extract_state_dict, read_state_file
from utils import is_distributed

from .category_ap import per_class_record
from .checkpoint import describe, is_released_detector, is_released_file, load_released_detector
from .data import build_detection_loaders
from .engine import BEST, RECORDED, DetectionTrainer, run_evaluation, train_one_epoch
from .model import METHODS, build_detector, dense_backbone, has_masks
from .predict import validation_drawer
from .recipe import decay_groups
from .released import is_released_detector as is_whole_released, load_released
from .schedule import build_detection_scheduler

logger = logging.getLogger(LOGGER_NAME)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser('python -m detection',
                                     description='FocalNet detectors on COCO-layout data')
    add_run_arguments(parser, cfg_help='config file (configs/detection/<method>_focalnet_<size>_<srf|lrf>_'
                                       '<1x|3x>.yaml); optional with --eval --resume <checkpoint>',
                      cfg_required=False, opts_example='MODEL.FOCAL.EMBED_DIM 32 TRAIN.EPOCHS 2',
                      data_help='COCO root: annotations/instances_<split>.json, <split>/',
                      pretrained_help='backbone weights to start from: ImageNet classification '
                                      'weights (official, timm or HF layout) or an official detection checkpoint')
    parser.add_argument('--show-dir', metavar='DIR', help='with --eval: save every validation image with '
                        'its detections drawn into DIR')
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
                'EVAL_FREQ', 'DETECTIONS_PER_IMAGE'):
        if d[key] < 1:
            raise UserError(f'DETECTION.{key} must be positive; got {d[key]}')


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
    return build_or_explain(build_detector, config, num_classes, what='detector')


def _check_categories(entries, loaders, path: str):
    saved = entries.get('categories')
    if saved is not None and list(saved) != list(loaders.label_to_category):
        raise UserError(f'checkpoint {path} was trained on category ids {list(saved)}, but the data '
                        f'has {list(loaders.label_to_category)}')


def run(args) -> int:
    config = get_config(args, require_cfg=True)
    check_detection_config(config)
    if config.EVAL_MODE and not (config.MODEL.RESUME or config.MODEL.PRETRAINED):
        raise UserError('--eval needs the detector to evaluate: --resume <checkpoint> (or --pretrained '
                        '<released mmdetection checkpoint>)')
    if args.show_dir and not config.EVAL_MODE:
        raise UserError('--show-dir draws the validation images of --eval; add --eval --resume <checkpoint>')
    # An evaluation writes no checkpoints: no lock to hold.
    with start_run(config, args.local_rank, training=not config.EVAL_MODE) as started:
        return run_in(config, started.device, started.out, args.show_dir)


def run_in(config, device: torch.device, out: str, show_dir: Optional[str] = None) -> int:
    method = config.DETECTION.METHOD
    loaders = build_detection_loaders(config, train=not config.EVAL_MODE, with_masks=has_masks(method))
    names = ', '.join(loaders.category_names[:10]) + (' ...' if loaders.num_classes > 10 else '')
    config = settle_config(config, out, loaders.num_classes, f'the categories of the annotations: {names}')
    model = make_detector(config, loaders.num_classes).to(device)
    logger.info(f'{method} on FocalNet: {count_params(model) / 1e6:.2f}M parameters '
                f'(backbone {count_params(dense_backbone(model)) / 1e6:.2f}M)')
    dtype, autocast = precision(config, device)

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
            _check_categories(state['entries'], loaders, config.MODEL.RESUME)
        show = validation_drawer(show_dir, loaders.val_coco, loaders.category_names) if show_dir else None
        metrics = run_evaluation(config, model, loaders, device, autocast, show)
        if show is not None:
            logger.info(f'drew {show.show.count} validation images into {show_dir}')
        record_evaluation(out, loaders.val, source, {'model': config.MODEL.NAME, 'released': released,
                                                     **{k: metrics.get(k) for k in RECORDED if k in metrics},
                                                     'images': metrics['images'],
                                                     **per_class_record(metrics, loaders.category_names)})
        return 0
    return train(config, loaders, model, device, autocast, dtype, out)


def train(config, loaders, model, device, autocast, dtype, out) -> int:
    """``model`` is the bare detector; the DDP wrapper (when distributed) only computes the steps."""
    if is_distributed():
        body = dense_backbone(model)
        match_grad_layout(body, lambda m: sum(o.float().sum() for o in m(
            torch.zeros(2, 3, 64, 64, device=device))).backward())
    updates = math.ceil(loaders.steps_per_epoch / max(1, config.TRAIN.ACCUMULATION_STEPS))
    groups = None
    if config.DETECTION.DECAY_GROUPS in ('official', 'all'):
        groups = decay_groups(model, config.TRAIN.WEIGHT_DECAY, spare=config.DETECTION.DECAY_GROUPS == 'official')
    optimizer, scheduler, scaler = build_optimization(config, model, device, dtype, lambda opt, scale: (
        build_detection_scheduler(config, opt, updates, scale)), groups=groups)

    found = resume_epochs(config, out, loaders, model=model, optimizer=optimizer, scaler=scaler,
                          load_weights=lambda: load_backbone_weights(model, config.MODEL.PRETRAINED,
                                                                    loaders.category_names))
    if found is None:
        return 0
    resumed, position, _ = found
    if resumed.path:
        _check_categories(resumed.entries, loaders, resumed.path)
    epochs = config.TRAIN.EPOCHS
    with epoch_training(DetectionTrainer, config, out, device, loaders, autocast, found, model=model,
                        optimizer=optimizer, scheduler=scheduler, scaler=scaler, score=BEST,
                        saved={'extra': {'categories': list(loaders.label_to_category),
                                          'category_names': list(loaders.category_names)}}) as (trainer, checkpoints):
        for epoch in range(resumed.start, epochs):
            resumed_here = seed_epoch(loaders, epoch, position, config.SEED)
            stats = train_one_epoch(trainer, loaders.train, epoch, loaders.steps_per_epoch, resumed_here)
            values = {'epoch': epoch, 'train_loss': stats['loss'], 'lr': stats['lr'],
                      'epoch_time_s': stats['time_s'],
                      **{k: v for k, v in stats.items() if k.startswith('loss_')}}
            # Saved before the evaluation that follows: an evaluation that fails loses no training.
            saved = checkpoints.end_epoch(epoch)
            if (epoch + 1) % config.DETECTION.EVAL_FREQ == 0 or epoch == epochs - 1:
                metrics = run_evaluation(config, model, loaders, device, autocast)
                values.update({k: metrics[k] for k in RECORDED if k in metrics})
                values.update(per_class_record(metrics, loaders.category_names))
                if (metrics.get(BEST) or 0.0) > checkpoints.best_score:
                    checkpoints.best_score = metrics[BEST]
                    if saved:  # the file of this epoch records the new best score too
                        checkpoints.save(epoch)
                values[f'best_{BEST}'] = checkpoints.best_score
            report_skipped((loaders.train, loaders.val), f'epoch {epoch}', out)
            best = f', {BEST} {values[BEST]:.2f} (best {checkpoints.best_score:.2f})' if BEST in values else ''
            logger.info(f'epoch {epoch}: train loss {stats["loss"]:.4f}, {stats["time_s"]:.0f}s{best}')
            record(out, values, trainer.writer, epoch, ('train_loss',) + RECORDED)
    return 0


def main(argv=None) -> int:
    return run_cli(lambda: run(parse_args(argv)))
