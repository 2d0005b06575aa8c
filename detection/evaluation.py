"""COCO evaluation with pycocotools: detector outputs become COCO results, COCOeval scores them."""
import contextlib
import io
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from pycocotools import mask as mask_util
from pycocotools.cocoeval import COCOeval

from engine.progress import Progress
from utils import all_gather_objects, get_rank

from .category_ap import category_ap, ground_truth_categories

logger = logging.getLogger('focalnet')

# COCOeval's summary, in the order of its ``stats``; the first three are what metrics.jsonl records.
STAT_NAMES = ('ap', 'ap50', 'ap75', 'ap_small', 'ap_medium', 'ap_large')


def to_coco_results(image_id: int, output: Dict[str, torch.Tensor],
                    label_to_category: Sequence[int]) -> List[dict]:
    """One image's detections (torchvision's output: ``boxes`` x1y1x2y2 in the image's pixels,
    ``labels`` 1..K, ``scores``, optionally ``masks`` (N, 1, H, W) probabilities) in COCO's results
    format: [x, y, w, h] boxes, category ids, and run-length-encoded masks binarised at 0.5."""
    boxes = output['boxes'].float().cpu()
    if not len(boxes):
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output['scores'].float().cpu().tolist()
    categories = [label_to_category[int(label) - 1] for label in output['labels'].cpu()]
    results = [{'image_id': int(image_id), 'category_id': c, 'bbox': b, 'score': s}
               for b, s, c in zip(xywh, scores, categories)]
    if 'masks' in output:
        binary = (output['masks'][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for result, rle in zip(results, rles):
            rle['counts'] = rle['counts'].decode('ascii')  # JSON-ready, as COCO's own files
            result['segmentation'] = rle
    return results


def coco_metrics(coco_gt, results: List[dict], iou_types: Sequence[str],
                 image_ids: Optional[Sequence[int]] = None) -> Dict[str, Optional[float]]:
    """``{iou_type}_{ap,ap50,ap75,ap_small,ap_medium,ap_large}`` in percent from COCOeval (None where
    COCOeval has no value, e.g. no object of that size), ``{iou_type}_per_class``: the AP of each
    category in the order of their ids (None for one without ground truth), and COCOeval's printed
    summary as 'summary'."""
    metrics: Dict[str, Optional[float]] = {}
    summary = []
    for iou_type in iou_types:
        if not results:  # COCO.loadRes refuses an empty list; nothing detected scores 0
            metrics.update({f'{iou_type}_{n}': 0.0 for n in STAT_NAMES})
            present = ground_truth_categories(coco_gt, image_ids)
            metrics[f'{iou_type}_per_class'] = [0.0 if c in present else None
                                                for c in sorted(coco_gt.getCatIds())]
            continue
        text = io.StringIO()
        with contextlib.redirect_stdout(text):  # pycocotools prints as it goes
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        summary.append(f'{iou_type}:\n' + '\n'.join(line for line in text.getvalue().splitlines()
                                                   if line.startswith(' Average')))
        for name, value in zip(STAT_NAMES, evaluator.stats):
            metrics[f'{iou_type}_{name}'] = 100.0 * float(value) if value >= 0 else None
        metrics[f'{iou_type}_per_class'] = category_ap(evaluator)
    metrics['summary'] = '\n'.join(summary)
    return metrics


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, autocast, coco_gt,
             label_to_category: Sequence[int], iou_types: Sequence[str], show=None) -> Dict[str, Optional[float]]:
    """Run the detector over the validation loader (each process its share), gather the results on
    rank 0 and score them there; every process returns the same metrics. ``show(image, target,
    output)``, when given, sees every image (``--show-dir``)."""
    model.eval()
    results, image_ids = [], []
    progress = Progress(len(loader))
    for i, (images, targets) in enumerate(loader):
        with autocast():
            outputs = model([image.to(device, non_blocking=True) for image in images])
        for image, target, output in zip(images, targets, outputs):
            if show is not None:
                show(image, target, output)
            image_ids.append(int(target['image_id']))
            results.extend(to_coco_results(target['image_id'], output, label_to_category))
        tick = progress.tick(i)
        if progress.due(i):
            logger.info(f'Test: [{i}/{len(loader)}]  eta {tick["eta"]}  time {tick["time"]:.3f}')
    gathered = all_gather_objects((results, image_ids))
    metrics: Dict[str, Optional[float]] = {}
    if get_rank() == 0:
        all_results = [r for rank_results, _ in gathered for r in rank_results]
        all_ids = [i for _, ids in gathered for i in ids]
        metrics = coco_metrics(coco_gt, all_results, iou_types, all_ids)
        metrics['images'] = len(all_ids)
        metrics['detections'] = len(all_results)
    return all_gather_objects(metrics)[0]
