"""What a segmentor's classes are called and drawn in: SEG.CLASS_NAMES, else ADE20K's for 150
classes; ADE20K's palette, extended with fixed random colours past its 150."""
from typing import List

import numpy as np

from class_report import by_name, table
from data.dataset_classes import ADE20K_CLASSES, ADE20K_PALETTE
from errors import UserError


def class_names(config) -> List[str]:
    names, k = list(config.SEG.CLASS_NAMES), config.MODEL.NUM_CLASSES
    if names:
        if len(names) != k:
            raise UserError(f'SEG.CLASS_NAMES names {len(names)} classes; MODEL.NUM_CLASSES is {k}')
        return [str(n) for n in names]
    return list(ADE20K_CLASSES) if k == len(ADE20K_CLASSES) else [f'class {i}' for i in range(k)]


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: ADE20K's for the first 150 classes (what its tools and
    mmsegmentation draw), then seeded random ones."""
    colours = np.array(ADE20K_PALETTE[:num_classes], dtype=np.uint8).reshape(-1, 3)
    extra = num_classes - len(colours)
    if extra > 0:
        rng = np.random.default_rng(150)
        colours = np.concatenate([colours, rng.integers(0, 256, (extra, 3), dtype=np.uint8)])
    return colours


def per_class_record(result: dict, names) -> dict:
    """metrics.jsonl's per-class entries: {'iou_per_class': {name: IoU or null}, 'acc_per_class': ...}."""
    return {'iou_per_class': by_name(names, result['iou']), 'acc_per_class': by_name(names, result['acc'])}


def per_class_table(result: dict, names) -> str:
    return table(names, {'IoU': result['iou'], 'Acc': result['acc']},
                 'IoU and Acc per class (- : the class is in neither the predictions nor the ground truth, '
                 'or, for Acc, not in the ground truth):')
