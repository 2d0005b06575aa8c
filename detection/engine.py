"""The detection loop: one training epoch (resumable part-way through) and the COCO evaluation
(train.py connects them to the data, the detector and the engine)."""
import logging
import math
import time
from typing import Dict, Optional

import torch

import faults
from engine.epochs import EpochTrainer, after_step, begin_epoch, report_step
from logger import NAME as LOGGER_NAME
from utils import get_rank

from .category_ap import per_class_table
from .evaluation import evaluate
from .model import has_masks

logger = logging.getLogger(LOGGER_NAME)

# What metrics.jsonl records of an evaluation (percent), and the score that picks the best epoch.
RECORDED = ('bbox_ap', 'bbox_ap50', 'bbox_ap75', 'segm_ap', 'segm_ap50', 'segm_ap75')
BEST = 'bbox_ap'


class DetectionTrainer(EpochTrainer):
    """The pieces a detection step uses: the engine's (the detector returns its own losses)."""


def _to(target: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in target.items()}


def train_one_epoch(t: DetectionTrainer, loader, epoch: int, num_steps: int,
                    resume: Optional[dict] = None) -> Dict[str, float]:
    """One epoch of ``num_steps`` micro-batches; the mean total loss and mean of each of the
    detector's losses. ``resume``: the position of a mid-epoch checkpoint of this epoch (its steps
    done and running totals), the loader already set to start after them. After every optimizer step,
    a signal or a due periodic save writes the position reached."""
    accumulation = t.optimizer_step.accumulation
    updates_per_epoch = math.ceil(num_steps / accumulation)
    # 'parts': the sum of each of the detector's losses
    first, totals, progress = begin_epoch(t, epoch, num_steps, resume,
                                          {'loss_sum': 0.0, 'norm_sum': 0.0, 'updates': 0, 'parts': {}})
    totals['parts'] = dict(totals['parts'])
    for idx, (images, targets) in enumerate(loader, start=first):
        images = [image.to(t.device, non_blocking=True) for image in images]
        targets = [_to(target, t.device) for target in targets]
        faults.inject('step', epoch * num_steps + idx, get_rank())
        if idx % accumulation == 0:
            t.scheduler.step_update(epoch * updates_per_epoch + idx // accumulation)
        parts: Dict[str, torch.Tensor] = {}

        def compute_loss() -> torch.Tensor:
            parts.update(t.model(images, targets))  # torchvision returns its losses in training
            return sum(parts.values())

        loss, grad_norm = t.optimizer_step(
            compute_loss, idx, num_steps, f'at epoch {epoch} step {idx}/{num_steps}; the newest '
                                          f'checkpoint was written before it')
        totals['loss_sum'] += loss
        for name, value in parts.items():
            totals['parts'][name] = totals['parts'].get(name, 0.0) + value.item()
        if grad_norm is not None:
            totals['norm_sum'] += grad_norm.item()
            totals['updates'] += 1
        report_step(t, epoch, idx, num_steps, loss, totals, progress,
                    '  '.join(f'{k} {v.item():.4f}' for k, v in parts.items()))
        after_step(t, epoch, idx, num_steps, totals)
    means = {'loss': totals['loss_sum'] / num_steps,
             **{k: v / num_steps for k, v in totals['parts'].items()}}
    means['lr'] = t.optimizer.param_groups[0]['lr']
    means['time_s'] = time.time() - progress.start
    return means


def run_evaluation(config, model, loaders, device, autocast, show=None) -> dict:
    """COCO box (and mask) AP of ``model`` (the bare detector) on the validation set, logged with
    the per-category table. ``show``, when given, draws every validation image (``--show-dir``)."""
    iou_types = ('bbox', 'segm') if has_masks(config.DETECTION.METHOD) else ('bbox',)
    metrics = evaluate(model, loaders.val, device, autocast, loaders.val_coco,
                       loaders.label_to_category, iou_types, show)
    if metrics.get('summary'):
        logger.info('COCO evaluation:\n' + metrics['summary'])
    shown = '  '.join(f'{k} {metrics[k]:.2f}' for k in RECORDED if metrics.get(k) is not None)
    logger.info(f' * {shown}  ({metrics["images"]} images, {metrics["detections"]} detections)')
    logger.info(per_class_table(metrics, loaders.category_names))
    return metrics
