"""Average precision per category from a finished COCOeval, as COCOeval's own summary computes the
overall AP: precision over IoU 0.50:0.95 and every recall step, area 'all', the largest maxDets,
cells of -1 (no ground truth) left out."""
from typing import Dict, List, Optional, Sequence

import numpy as np

from class_report import by_name, table


def category_ap(evaluator) -> List[Optional[float]]:
    """AP in percent of each category of ``evaluator.params.catIds`` (sorted ids), None for a
    category without ground truth in the evaluated images."""
    precision = evaluator.eval['precision']  # (iou thresholds, recall steps, categories, areas, maxDets)
    area = evaluator.params.areaRngLbl.index('all')
    out: List[Optional[float]] = []
    for k in range(precision.shape[2]):
        cells = precision[:, :, k, area, -1]
        cells = cells[cells > -1]
        out.append(100.0 * float(np.mean(cells)) if cells.size else None)
    return out


def ground_truth_categories(coco_gt, image_ids: Optional[Sequence[int]]) -> set:
    """Category ids with at least one non-crowd object in the evaluated images."""
    ids = set(coco_gt.getImgIds() if image_ids is None else image_ids)
    return {a['category_id'] for a in coco_gt.anns.values() if a['image_id'] in ids and not a.get('iscrowd', 0)}


def per_class_record(metrics: dict, names: Sequence[str]) -> Dict[str, Dict[str, Optional[float]]]:
    """metrics.jsonl's per-category entries: {'bbox_ap_per_class': {name: AP or null}, ...}."""
    return {f'{t}_ap_per_class': by_name(names, metrics[f'{t}_per_class'])
            for t in ('bbox', 'segm') if f'{t}_per_class' in metrics}


def per_class_table(metrics: dict, names: Sequence[str]) -> str:
    columns = {f'{t}_AP': metrics[f'{t}_per_class'] for t in ('bbox', 'segm') if f'{t}_per_class' in metrics}
    return table(names, columns, 'AP per category (- : no object of it in the evaluated images):')
