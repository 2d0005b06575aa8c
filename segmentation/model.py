"""The segmentor: a dense FocalNet backbone, the UPerNet decode head and the auxiliary FCN head.

As mmsegmentation's EncoderDecoder: the decode head's logits (at a quarter of the input size) are
upsampled bilinearly to the input size; in training each head's logits are upsampled to the label
size and scored with cross-entropy, the auxiliary loss weighted. The parts are attributes named as in
the released checkpoints: ``backbone``, ``decode_head``, ``auxiliary_head``.
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.dense import FocalNetDense, build_dense_backbone

from .heads import FCNHead, UPerHead, resize
from .transforms import IGNORE_INDEX


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits upsampled to the labels' size, averaged over all pixels, ignored ones
    counting as zero (mmseg's default reduction, which the released models were trained with)."""
    logits = resize(logits, labels.shape[-2:])
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE_INDEX, reduction='none').mean()


class Segmentor(nn.Module):
    """``model(images)``: logits (B, K, H, W) at the input size. ``model(images, labels)``: the losses
    {'loss', 'loss_decode', 'loss_aux'}, through forward so that DistributedDataParallel sees it.

    backbone: returns one map per stage, finest first, and lists their widths in ``out_channels``.
    aux_index: which of the backbone's maps feeds the auxiliary head; aux_weight its loss weight.
    """

    def __init__(self, backbone: nn.Module, decode_head: UPerHead, auxiliary_head: Optional[FCNHead] = None,
                 aux_index: int = 2, aux_weight: float = 0.4):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.aux_index, self.aux_weight = aux_index, aux_weight

    @property
    def num_classes(self) -> int:
        return self.decode_head.conv_seg.out_channels

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        inner = self.backbone.no_weight_decay() if hasattr(self.backbone, 'no_weight_decay') else set()
        return {f'backbone.{n}' for n in inner}

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None):
        features = self.backbone(images)
        logits = self.decode_head(features)
        if labels is None:
            return resize(logits, images.shape[-2:])
        losses = {'loss_decode': pixel_cross_entropy(logits, labels)}
        loss = losses['loss_decode']
        if self.auxiliary_head is not None:
            losses['loss_aux'] = pixel_cross_entropy(self.auxiliary_head(features[self.aux_index]), labels)
            loss = loss + self.aux_weight * losses['loss_aux']
        losses['loss'] = loss
        return losses


def upernet(backbone: nn.Module, num_classes: int, *, channels: int = 512,
            pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, aux_channels: int = 256,
            aux_index: int = 2, aux_weight: float = 0.4) -> Segmentor:
    """UPerNet on ``backbone``, with the auxiliary FCN head on map ``aux_index`` (none when
    ``aux_weight`` is 0)."""
    widths = list(backbone.out_channels)
    aux = None
    if aux_weight > 0:
        aux = FCNHead(widths[aux_index], num_classes, aux_channels, num_convs=1, dropout=dropout)
    return Segmentor(backbone, UPerHead(widths, num_classes, channels, pool_scales, dropout), aux,
                     aux_index, aux_weight)


def build_segmentor(config) -> Segmentor:
    """The UPerNet a config describes: backbone from MODEL.FOCAL.*, MODEL.DROP_PATH_RATE and
    TRAIN.USE_CHECKPOINT; heads from SEG.HEAD.*; classes from MODEL.NUM_CLASSES."""
    head = config.SEG.HEAD
    backbone: FocalNetDense = build_dense_backbone(config, out_indices=range(len(config.MODEL.FOCAL.DEPTHS)))
    return upernet(backbone, config.MODEL.NUM_CLASSES, channels=head.CHANNELS,
                   pool_scales=tuple(head.POOL_SCALES), dropout=head.DROPOUT,
                   aux_channels=head.AUX_CHANNELS, aux_index=head.AUX_INDEX, aux_weight=head.AUX_WEIGHT)
