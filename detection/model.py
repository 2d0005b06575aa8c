"""torchvision detectors on the FocalNet dense backbone.

The detector is a composition: ``FocalNetFPN`` (the dense backbone and torchvision's feature pyramid)
is what torchvision's detectors take as ``backbone``; they own the heads, the losses, the resizing and
the post-processing. Mask R-CNN and Faster R-CNN are built with mmdetection's arithmetic
(detection/mmdet_heads.py), so that the released checkpoints give their published results;
RetinaNet and FCOS are torchvision's own.
"""
from collections import OrderedDict
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import (ExtraFPNBlock, FeaturePyramidNetwork,
                                                     LastLevelMaxPool, LastLevelP6P7)

from models.dense import FocalNetDense, build_dense_backbone

from .mmdet_heads import build_rcnn

METHODS = ('mask_rcnn', 'faster_rcnn', 'retinanet', 'fcos', 'atss', 'cascade_mask_rcnn', 'sparse_rcnn')
TWO_STAGE = ('mask_rcnn', 'faster_rcnn')
# Detectors written with mmdetection's names, whose released checkpoints load whole.
RELEASED_LOADABLE = ('atss', 'cascade_mask_rcnn', 'sparse_rcnn')


class FocalNetFPN(nn.Module):
    """The dense backbone's maps through torchvision's FPN: an ordered dict of ``out_channels`` maps,
    as torchvision's ``BackboneWithFPN`` returns (whose layer getter cannot run a FocalNet)."""

    def __init__(self, body: FocalNetDense, out_channels: int = 256,
                 extra_blocks: Optional[ExtraFPNBlock] = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.out_channels), out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        maps = self.body(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class ResizeNormalize(GeneralizedRCNNTransform):
    """torchvision's normalise-resize-batch step with a test size of its own (torchvision's tests at
    the largest training size)."""

    def __init__(self, train_sizes: Sequence[int], test_size: int, max_size: int):
        super().__init__(tuple(train_sizes), max_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        self.train_sizes, self.test_size = tuple(train_sizes), int(test_size)

    def resize(self, image, target=None):
        self.min_size = self.train_sizes if self.training else (self.test_size,)
        return super().resize(image, target)


def backbone_out_indices(method: str) -> tuple:
    # Two-stage detectors pool RoIs from strides 4-32; the one-stage heads start at stride 8.
    return (0, 1, 2, 3) if method in TWO_STAGE else (1, 2, 3)


def build_detector(config, num_classes: int) -> nn.Module:
    """The detector ``config.DETECTION.METHOD`` for ``num_classes`` object classes (labels 1..K; 0 is
    background for the two-stage heads and never a target for the one-stage ones)."""
    d = config.DETECTION
    method = d.METHOD
    if method not in METHODS:
        raise ValueError(f'unknown DETECTION.METHOD {method!r}; expected one of {", ".join(METHODS)}')
    if method == 'atss':  # written with mmdetection's names (detection/atss.py), not torchvision's
        from .atss import build_atss
        return build_atss(config, num_classes)
    if method == 'cascade_mask_rcnn':
        from .cascade_rcnn import build_cascade_mask_rcnn
        return build_cascade_mask_rcnn(config, num_classes)
    if method == 'sparse_rcnn':
        from .sparse_rcnn import build_sparse_rcnn
        return build_sparse_rcnn(config, num_classes)
    body = build_dense_backbone(config, backbone_out_indices(method))
    C = d.FPN_CHANNELS
    extra = LastLevelMaxPool() if method in TWO_STAGE else LastLevelP6P7(C, C)
    backbone = FocalNetFPN(body, C, extra)
    classes = num_classes + 1
    if method in TWO_STAGE:
        # mmdetection's test path and training recipe (detection/mmdet_heads.py); a released
        # checkpoint loads into it whole (detection/checkpoint.py).
        return build_rcnn(method, backbone, num_classes, train_sizes=d.MIN_SIZE_TRAIN, max_size=d.MAX_SIZE,
                          test_scale=(d.MAX_SIZE, d.MIN_SIZE_TEST), box_head_dim=d.BOX_HEAD_DIM,
                          mask_head_dim=d.MASK_HEAD_DIM, rpn_batch_size=d.RPN_BATCH_SIZE,
                          roi_batch_size=d.ROI_BATCH_SIZE, score_thresh=d.SCORE_THRESH,
                          detections_per_img=d.DETECTIONS_PER_IMAGE)
    common = dict(min_size=tuple(d.MIN_SIZE_TRAIN), max_size=d.MAX_SIZE,
                  image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
    cls = RetinaNet if method == 'retinanet' else FCOS
    model = cls(backbone, classes, score_thresh=d.SCORE_THRESH,
                detections_per_img=d.DETECTIONS_PER_IMAGE, **common)
    model.transform = ResizeNormalize(d.MIN_SIZE_TRAIN, d.MIN_SIZE_TEST, d.MAX_SIZE)
    return model


def dense_backbone(model: nn.Module) -> FocalNetDense:
    """The FocalNet inside a detector built by build_detector (``backbone.body`` of the torchvision
    ones, ``backbone`` of those with mmdetection's names)."""
    return model.backbone if isinstance(model.backbone, FocalNetDense) else model.backbone.body


def has_masks(method: str) -> bool:
    return method in ('mask_rcnn', 'cascade_mask_rcnn')
