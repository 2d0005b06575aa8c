"""Parameters and FLOPs of a detector as the paper's detection table counts them.

The official numbers come from mmdetection's get_flops at 1280x800: the backbone, the neck, and the
heads run as in mmdetection's ``forward_dummy`` (two-stage: the RPN head on every level, the box head
on 1000 RoIs and the mask head on the first 100; one-stage: the dense head on every level). FLOPs are
multiply-adds. Here the backbone is counted as models.cost counts FocalNets (the paper's ImageNet
convention), everything after it with torch's FlopCounterMode (convolutions and matrix products) on
shape-only tensors, so nothing is computed.
"""
from collections import OrderedDict
from typing import Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.cost import count_dense_flops, count_params

from .model import TWO_STAGE, build_detector, dense_backbone, has_masks


# The official FocalNet README's Mask R-CNN rows (mmdetection): parameters (M), GFLOPs at 1280x800,
# box and mask mAP for the 1x and 3x schedules.
PAPER_MASK_RCNN = {
    'mask_rcnn_focalnet_tiny_srf': dict(kernels='[9,11]', params_m=48.6, gflops=267, box_map=(45.9, 47.6), mask_map=(41.3, 42.6)),
    'mask_rcnn_focalnet_tiny_lrf': dict(kernels='[9,11,13]', params_m=48.8, gflops=268, box_map=(46.1, 48.0), mask_map=(41.5, 42.9)),
    'mask_rcnn_focalnet_small_srf': dict(kernels='[9,11]', params_m=70.8, gflops=356, box_map=(48.0, 48.9), mask_map=(42.7, 43.6)),
    'mask_rcnn_focalnet_small_lrf': dict(kernels='[9,11,13]', params_m=72.3, gflops=365, box_map=(48.3, 49.3), mask_map=(43.1, 43.8)),
    'mask_rcnn_focalnet_base_srf': dict(kernels='[9,11]', params_m=109.4, gflops=496, box_map=(48.8, 49.6), mask_map=(43.3, 44.1)),
    'mask_rcnn_focalnet_base_lrf': dict(kernels='[9,11,13]', params_m=111.4, gflops=507, box_map=(49.0, 49.8), mask_map=(43.5, 44.1)),
}

# The official README's "other detection methods" rows, FocalNet-T with focal windows [11,9,9,7] and
# three focal levels (the LRF configs), 3x schedule: parameters (M), GFLOPs at 1280x800, box mAP.
# Sparse R-CNN counts 3.2 GFLOPs more here than the paper: the batched products of its dynamic
# convolutions and attention, which FlopCounterMode sees and mmcv's module hooks do not.
PAPER_OTHER_METHODS = {
    'atss_focalnet_tiny_lrf_3x': dict(method='ATSS', params_m=37.2, gflops=220, box_map=49.6),
    'cascade_mask_rcnn_focalnet_tiny_lrf_3x': dict(method='Cascade Mask R-CNN', params_m=87.1, gflops=751, box_map=51.5),
    'sparse_rcnn_focalnet_tiny_lrf_3x': dict(method='Sparse R-CNN', params_m=111.2, gflops=178, box_map=49.9),
}


def _grids(body, height: int, width: int):
    """(H, W) of every stage output: the stem and each downsampler round up (the dense padding)."""
    H, W = -(-height // body.patch_size), -(-width // body.patch_size)
    grids = []
    for _ in body.layers:
        grids.append((H, W))
        H, W = -(-H // 2), -(-W // 2)
    return grids


def _torchvision_heads(model, method: str, features, rois: int, mask_rois: int):
    channels = model.backbone.out_channels
    pyramid = list(model.backbone.fpn(features).values())
    if method in TWO_STAGE:
        model.rpn.head(pyramid)
        heads = model.roi_heads
        box = heads.box_roi_pool.output_size
        heads.box_predictor(heads.box_head(torch.empty(rois, channels, *box, device='meta')))
        if has_masks(method):
            mask = heads.mask_roi_pool.output_size
            heads.mask_predictor(heads.mask_head(torch.empty(mask_rois, channels, *mask, device='meta')))
    else:
        model.head(pyramid)


def detector_cost(config, num_classes: int = 80, size: Tuple[int, int] = (800, 1280),
                  rois: int = 1000, mask_rois: int = 100) -> dict:
    """{'params', 'gflops', 'backbone_params', 'backbone_gflops'} of the detector ``config`` describes,
    for ``num_classes`` classes on a (height, width) input."""
    with torch.device('meta'):
        model = build_detector(config, num_classes)
    body = dense_backbone(model)
    height, width = size
    grids = _grids(body, height, width)
    features = OrderedDict(
        (str(k), torch.empty(1, body.dims[i], *grids[i], device='meta'))
        for k, i in enumerate(body.out_indices))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if hasattr(model, 'heads_for_cost'):  # the detectors with mmdetection's names count themselves
            model.heads_for_cost(list(features.values()))
        else:
            _torchvision_heads(model, config.DETECTION.METHOD, features, rois, mask_rois)
    backbone_flops = count_dense_flops(body, (height, width))
    return {'params': count_params(model), 'gflops': (backbone_flops + counter.get_total_flops() / 2) / 1e9,
            'backbone_params': count_params(body), 'backbone_gflops': backbone_flops / 1e9}
