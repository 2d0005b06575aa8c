"""Semantic segmentation with FocalNet backbones: UPerNet, ADE20K data, mIoU, training and evaluation.

``python -m segmentation --help`` runs it; see docs/segmentation.md.
"""
from .heads import FCNHead, UPerHead
from .inference import predict, predict_probs
from .metrics import SegmentationMetric
from .model import Segmentor, build_segmentor, upernet

__all__ = ['FCNHead', 'UPerHead', 'predict', 'predict_probs', 'SegmentationMetric', 'Segmentor',
           'build_segmentor', 'upernet']
