"""A stand-in for mmcv's compiled extension (``mmcv._ext``) built on ``torchvision.ops``.

mmcv-lite ships mmcv's Python without its C++/CUDA kernels; ``mmcv.ops`` then fails to import, and
with it every mmdetection detector. The test paths of the released detectors and segmentors call two
kernels, NMS and RoIAlign (average mode), both of which torchvision has with the same semantics:
``sampling_ratio=0`` is adaptive in both, ``aligned`` shifts by half a pixel in both. Every other
kernel that mmcv.ops asks for at import time exists here but raises when called, so a reference run
can never quietly use something this shim does not really provide.

Call ``install()`` before the first ``import mmcv.ops`` / ``import mmdet.models``.
"""
import importlib.machinery
import sys
import types

import torch
import torchvision

_AVERAGE_POOL = 1


def nms(boxes, scores, iou_threshold, offset=0):
    if offset != 0:
        raise NotImplementedError(f'nms with offset={offset} (legacy +1 box widths) is not provided')
    return torchvision.ops.nms(boxes.float(), scores.float(), float(iou_threshold))


def roi_align_forward(features, rois, output, argmax_y, argmax_x, aligned_height, aligned_width,
                      spatial_scale, sampling_ratio, pool_mode, aligned):
    if pool_mode != _AVERAGE_POOL:
        raise NotImplementedError('roi_align with max pooling is not provided')
    pooled = torchvision.ops.roi_align(features, rois, (aligned_height, aligned_width),
                                       spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                                       aligned=bool(aligned))
    output.copy_(pooled)


def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, aligned_height,
                       aligned_width, spatial_scale, sampling_ratio, pool_mode, aligned):
    if pool_mode != _AVERAGE_POOL:
        raise NotImplementedError('roi_align with max pooling is not provided')
    batch, channels, height, width = grad_input.shape
    grad = torch.ops.torchvision._roi_align_backward(
        grad_output.contiguous(), rois, float(spatial_scale), aligned_height, aligned_width, batch,
        channels, height, width, sampling_ratio, bool(aligned))
    grad_input.copy_(grad)


_PROVIDED = {'nms': nms, 'roi_align_forward': roi_align_forward,
             'roi_align_backward': roi_align_backward}


def _missing(name):
    def kernel(*args, **kwargs):
        raise NotImplementedError(f'mmcv kernel {name!r} is not provided by tests/mmref/shim.py')
    kernel.__name__ = name
    return kernel


def install():
    """Register the stand-in as ``mmcv._ext`` (idempotent) and return it."""
    existing = sys.modules.get('mmcv._ext')
    if existing is not None:
        return existing
    module = types.ModuleType('mmcv._ext')
    # A spec without a loader: importlib.util.find_spec works on it, and mmengine's
    # mmcv_full_available() (pkgutil.find_loader) answers False rather than raising.
    module.__spec__ = importlib.machinery.ModuleSpec('mmcv._ext', None)
    module.__dict__.update(_PROVIDED)
    # mmcv.ops checks with hasattr() that each kernel it binds exists; answer every name.
    module.__getattr__ = lambda name: (_ for _ in ()).throw(AttributeError(name)) \
        if name.startswith('__') else _missing(name)
    sys.modules['mmcv._ext'] = module
    return module
