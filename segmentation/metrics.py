"""mIoU, mAcc and aAcc over a whole data set, computed as mmsegmentation computes them.

Per class, the pixel areas of intersection, union, prediction and ground truth are summed over every
image (and every process) first; then IoU = intersection / union and Acc = intersection / ground truth
per class. A class with no pixel in either the predictions or the ground truth has no IoU (0 / 0) and
is left out of the mean, as is a class absent from the ground truth from mAcc. aAcc is the share of all
labelled pixels predicted right. Pixels labelled ``ignore_index`` count nowhere.
"""
import logging
from typing import Dict

import torch

from utils import all_reduce_sum

logger = logging.getLogger('focalnet')


class SegmentationMetric:
    """Accumulates per-class pixel areas with ``update`` and reduces them with ``compute``."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device='cpu'):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        # intersection, prediction, ground truth; float64 keeps counts exact up to 2**53 pixels
        self.areas = torch.zeros(3, num_classes, dtype=torch.float64, device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor):
        """``pred`` and ``label``: class indices of the same shape (any number of images)."""
        if pred.shape != label.shape:
            raise ValueError(f'prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape')
        valid = label != self.ignore_index
        pred, label = pred[valid].long(), label[valid].long()
        k = self.num_classes
        self.areas[0] += torch.bincount(label[pred == label], minlength=k)[:k]
        self.areas[1] += torch.bincount(pred, minlength=k)[:k]
        self.areas[2] += torch.bincount(label, minlength=k)[:k]

    def compute(self) -> Dict[str, object]:
        """{'miou', 'macc', 'aacc'} in percent, and per-class 'iou' and 'acc' lists (None where
        undefined), summed over all processes."""
        intersect, area_pred, area_label = all_reduce_sum(self.areas).cpu()
        if area_label.sum() == 0:
            logger.warning('mIoU, mAcc and aAcc are undefined: no pixel of the validation labels counts '
                           f'(every one is ignored: {self.ignore_index}, or 0 with SEG.REDUCE_ZERO_LABEL); '
                           'they are recorded as null')
        union = area_pred + area_label - intersect
        iou = intersect / union            # nan where the class is in neither
        acc = intersect / area_label       # nan where the class is not in the ground truth

        def mean(values):
            values = values[~values.isnan()]
            return 100 * values.mean().item() if len(values) else float('nan')

        return {
            'miou': mean(iou),
            'macc': mean(acc),
            'aacc': 100 * (intersect.sum() / area_label.sum()).item() if area_label.sum() > 0 else float('nan'),
            'iou': [None if v.isnan() else 100 * v.item() for v in iou],
            'acc': [None if v.isnan() else 100 * v.item() for v in acc],
        }
