"""UPerNet's decode head and the auxiliary FCN head.

Parameter names are mmsegmentation's (UPerHead, its PPM, FCNHead, mmcv's ConvModule with ``conv`` and
``bn``), so the released ADE20K checkpoints load through the table in segmentation/checkpoint.py.
Reads top-down: conv block, pyramid pooling, UPerNet head, FCN head.
"""
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, align_corners=False: what the released models were trained with."""
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class ConvBNReLU(nn.Module):
    """Convolution (no bias: the norm has one), batch norm, ReLU; mmcv's ConvModule with a norm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class PyramidPooling(nn.ModuleList):
    """Average-pool the map to s x s cells for each scale s, project each with a 1x1 conv block, and
    upsample back; returns the upsampled branches (mmseg's PPM: ``psp_modules.<i>.1.conv``)."""

    def __init__(self, scales: Sequence[int], in_channels: int, channels: int):
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels, 1))
                         for s in scales)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [resize(branch(x), x.shape[2:]) for branch in self]


class DecodeHead(nn.Module):
    """What both heads end with: dropout, then a 1x1 classifier (``conv_seg``)."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))

    def init_weights(self):
        # mmcv's ConvModule init (Kaiming normal, fan-out, for ReLU; norms 1 and 0) and mmseg's
        # N(0, 0.01) classifier.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)


class UPerHead(DecodeHead):
    """UPerNet (Xiao et al., 2018) on the backbone's maps, finest first; logits at the finest grid.

    Three steps: pyramid pooling on the coarsest map, top-down FPN fusion of all maps, then every
    level upsampled to the finest grid, concatenated and fused by a 3x3 conv block.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.psp_modules = PyramidPooling(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.init_weights()

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        # 1. Pyramid pooling: global-to-local context of the coarsest map, fused to `channels`.
        top = features[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        # 2. Top-down pathway: each level adds the upsampled level above it (already fused).
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        # 3. Smooth every level but the top with a 3x3 conv, bring all to the finest grid, fuse.
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [resize(o, size) for o in outs[1:]], dim=1))
        return self.classify(fused)


class FCNHead(DecodeHead):
    """The auxiliary head: ``num_convs`` 3x3 conv blocks on one backbone map, then the classifier.
    It adds a weighted loss in training and is not used for prediction."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1,
                 dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.convs = nn.Sequential(*(ConvBNReLU(in_channels if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)))
        self.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.convs(x))
