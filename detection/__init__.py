"""Object detection with FocalNet backbones: torchvision's Mask R-CNN, Faster R-CNN, RetinaNet and FCOS,
and ATSS, Cascade Mask R-CNN and Sparse R-CNN written with mmdetection's names (atss.py, cascade_rcnn.py,
sparse_rcnn.py), on the
dense backbone (models/dense.py), COCO-layout data, pycocotools evaluation.

    python -m detection --cfg configs/detection/<method>_focalnet_<size>_<srf|lrf>_<1x|3x>.yaml \
        --data-path <coco root> [--pretrained <imagenet weights>] --output <dir> [--opts KEY VALUE ...]
"""
from .model import METHODS, FocalNetFPN, build_detector, dense_backbone

__all__ = ['METHODS', 'FocalNetFPN', 'build_detector', 'dense_backbone']
