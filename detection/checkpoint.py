"""The released COCO detectors (mmdetection checkpoints) loaded whole into the two-stage detectors.

A released file is an mmdetection training checkpoint, ``{'meta', 'state_dict'}`` and maybe
``optimizer``; ``meta['CLASSES']`` names the classes in label order (mmdetection's label i is the i-th
COCO category by ascending id). ``KEY_MAP`` below is the whole conversion: every tensor of the file
must match one row, which names its key here and, where mmdetection lays the tensor out differently,
the reordering that converts it. A key outside the table, a tensor the detector lacks or one of another
shape is an error listing them.

Three reorderings, because mmdetection's classifiers have no background row or put it last:

- ``fc_cls`` (K+1 rows, background last) -> ``cls_score`` (background first): ``background_first``;
- ``fc_reg`` (4K rows) -> ``bbox_pred`` (4(K+1) rows): ``zero_background_boxes`` adds the background's
  four rows as zeros (never used: the background's boxes are dropped);
- ``conv_logits`` (K channels) -> ``mask_fcn_logits`` (K+1): ``zero_background_mask`` likewise.
"""
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from models.pretrained import CheckpointError, read_state_file
from models.state_fit import fit_problems, listing


def background_first(t: torch.Tensor) -> torch.Tensor:
    """Rows (or bias entries) of K classes then background -> background then the K classes."""
    return torch.cat([t[-1:], t[:-1]])


def zero_background_boxes(t: torch.Tensor) -> torch.Tensor:
    """4K box-regression rows -> 4(K+1), the background's four first and zero."""
    return torch.cat([t.new_zeros((4,) + t.shape[1:]), t])


def zero_background_mask(t: torch.Tensor) -> torch.Tensor:
    """K mask-logit channels -> K+1, the background's first and zero."""
    return torch.cat([t.new_zeros((1,) + t.shape[1:]), t])


# (key in the released checkpoint (a regular expression), key here (groups substituted), reordering)
KEY_MAP: List[Tuple[str, str, Optional[Callable[[torch.Tensor], torch.Tensor]]]] = [
    # The FocalNet: same names (models/dense.py).
    (r'backbone\.(.+)', r'backbone.body.\1', None),
    # FPN: mmcv ConvModules (conv with bias, no norm) -> torchvision's Conv2dNormActivation blocks.
    (r'neck\.lateral_convs\.(\d)\.conv\.(weight|bias)', r'backbone.fpn.inner_blocks.\1.0.\2', None),
    (r'neck\.fpn_convs\.(\d)\.conv\.(weight|bias)', r'backbone.fpn.layer_blocks.\1.0.\2', None),
    # RPN: same anchor order and channel layout.
    (r'rpn_head\.rpn_conv\.(weight|bias)', r'rpn.head.conv.0.0.\1', None),
    (r'rpn_head\.rpn_cls\.(weight|bias)', r'rpn.head.cls_logits.\1', None),
    (r'rpn_head\.rpn_reg\.(weight|bias)', r'rpn.head.bbox_pred.\1', None),
    # Box head: two shared fully connected layers, the classifier and the class-specific regressor.
    (r'roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)', r'roi_heads.box_head.fc6.\1', None),
    (r'roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)', r'roi_heads.box_head.fc7.\1', None),
    (r'roi_head\.bbox_head\.fc_cls\.(weight|bias)', r'roi_heads.box_predictor.cls_score.\1', background_first),
    (r'roi_head\.bbox_head\.fc_reg\.(weight|bias)', r'roi_heads.box_predictor.bbox_pred.\1', zero_background_boxes),
    # Mask head: four 3x3 convs, the 2x transposed conv, the per-class logits.
    (r'roi_head\.mask_head\.convs\.(\d)\.conv\.(weight|bias)', r'roi_heads.mask_head.\1.0.\2', None),
    (r'roi_head\.mask_head\.upsample\.(weight|bias)', r'roi_heads.mask_predictor.conv5_mask.\1', None),
    (r'roi_head\.mask_head\.conv_logits\.(weight|bias)', r'roi_heads.mask_predictor.mask_fcn_logits.\1',
     zero_background_mask),
]
_COMPILED = [(re.compile(theirs), ours, fn) for theirs, ours, fn in KEY_MAP]

def is_released_detector(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is a whole mmdetection two-stage detector (not a backbone only)."""
    return any(k.startswith(('rpn_head.', 'roi_head.')) for k in state)


def is_released_file(path: str) -> bool:
    """Whether ``path`` holds a whole released mmdetection two-stage detector ({'state_dict'} with
    RPN and RoI heads); False for this codebase's own checkpoints and anything unreadable."""
    try:
        checkpoint = read_state_file(path, 'cpu', mmap=True)
    except CheckpointError:
        return False
    state = checkpoint.get('state_dict') if isinstance(checkpoint, Mapping) else None
    return isinstance(state, Mapping) and is_released_detector(state)


def convert_released(state: Mapping[str, torch.Tensor], source: str = 'checkpoint'
                     ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The released state dict in this codebase's keys, and the keys whose tensors were reordered.
    A key that no row of KEY_MAP matches is an error naming it."""
    out, reordered, unknown = {}, [], []
    for key, value in state.items():
        for pattern, ours, fn in _COMPILED:
            match = pattern.fullmatch(key)
            if match:
                name = match.expand(ours)
                out[name] = fn(value) if fn is not None else value
                if fn is not None:
                    reordered.append(f'{key} ({fn.__name__})')
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f'{source}: not a Mask R-CNN / Faster R-CNN checkpoint of the released layout: '
                              + f'{len(unknown)} keys outside its table (detection/checkpoint.py KEY_MAP): '
                              + listing(unknown, sep='; '))
    return out, reordered


def released_classes(checkpoint: Mapping) -> Optional[List[str]]:
    meta = checkpoint.get('meta') if isinstance(checkpoint, Mapping) else None
    if isinstance(meta, Mapping):
        classes = meta.get('CLASSES') or (meta.get('dataset_meta') or {}).get('classes')
        if classes:
            return [str(c) for c in classes]
    return None


def check_classes(classes: Optional[Sequence[str]], category_names: Sequence[str], source: str):
    """The checkpoint's classes must be the annotation file's categories, in the order of their ids."""
    if classes is None:
        return
    if list(classes) != list(category_names):
        differ = [f'label {i + 1}: file {a!r} vs annotations {b!r}'
                  for i, (a, b) in enumerate(zip(classes, category_names)) if a != b]
        raise CheckpointError(
            f'{source}: its classes (meta CLASSES, {len(classes)}) are not the annotation file\'s '
            f'categories ({len(category_names)}) in id order'
            + (': ' + '; '.join(differ[:5]) if differ else ''))


def load_released_detector(model: nn.Module, path: str,
                           category_names: Optional[Sequence[str]] = None) -> dict:
    """Load a released mmdetection Mask R-CNN / Faster R-CNN checkpoint into ``model`` (built by
    build_detector) strictly. Returns the report {'path', 'layout', 'loaded', 'reordered',
    'classes'}; raises CheckpointError for any key, tensor or class that does not fit."""
    checkpoint = read_state_file(path, 'cpu')
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get('state_dict'), Mapping):
        raise CheckpointError(f'{path}: not an mmdetection checkpoint (no state_dict)')
    state, reordered = convert_released(checkpoint['state_dict'], path)
    classes = released_classes(checkpoint)
    if category_names is not None:
        check_classes(classes, category_names, path)
    target = model.state_dict()
    problems = fit_problems(state, target, sep='; ')
    if problems:
        raise CheckpointError(f'{path}: the checkpoint does not fit the detector (DETECTION.METHOD, '
                              f'MODEL.FOCAL.*, the head widths, the number of classes): ' + ' | '.join(problems))
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()}, strict=True)
    return {'path': str(path), 'layout': 'mmdetection', 'loaded': len(state), 'reordered': reordered,
            'classes': classes}


def describe(report: dict) -> str:
    """One log line of a load_released_detector report."""
    classes = report['classes']
    return (f'{report["path"]}: loaded the whole detector ({report["loaded"]} tensors) from the '
            f'{report["layout"]} layout; reordered {len(report["reordered"])}: '
            f'{", ".join(report["reordered"]) or "none"}; classes '
            + (f'{len(classes)} from the checkpoint, checked against the annotations' if classes
               else 'not named in the file (the annotations\' order is assumed)'))
