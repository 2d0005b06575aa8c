"""Parameter and FLOP counts as the FocalNet paper reports them.

FLOPs are multiply-adds. Besides the convolutions and linear layers, the paper counts one operation
per element for each layer norm, each focal level's gating, the global context and the modulation
(q * modulator); this module follows that convention so the ImageNet table can be checked.
"""
from typing import Tuple, Union

import torch.nn as nn

from .focalnet import FocalNet, PatchEmbed


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv_out(size: int, conv: nn.Conv2d) -> int:
    # Nothing is padded beyond the convolution's own padding: the classification model floors.
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return (size + 2 * p - k) // s + 1


def _embed_flops(embed: PatchEmbed, H: int, W: int) -> Tuple[int, int, int]:
    conv = embed.proj
    Ho, Wo = _conv_out(H, conv), _conv_out(W, conv)
    kh, kw = conv.kernel_size
    flops = Ho * Wo * conv.out_channels * conv.in_channels * kh * kw
    if embed.norm is not None:
        flops += Ho * Wo * conv.out_channels
    return flops, Ho, Wo


def _block_flops(block: nn.Module, N: int) -> int:
    mod = block.modulation
    C, L = mod.dim, mod.focal_level
    flops = 2 * N * C                                   # norm1, norm2
    flops += N * C * (2 * C + L + 1)                    # f: query, context, gates
    flops += sum(N * C * (k * k + 1) for k in mod.kernel_sizes)  # depth-wise levels + gating
    flops += N * C                                      # global context gating
    flops += N * C * (C + 1)                            # h, then q * modulator
    flops += N * C * C                                  # proj
    flops += 2 * N * C * block.mlp.fc1.out_features     # mlp
    if hasattr(mod, 'ln'):
        flops += N * C
    return flops


def count_flops(model: FocalNet, img_size: Union[int, Tuple[int, int]] = 224) -> int:
    """Multiply-adds of one forward pass on an ``img_size`` input, counted as in the paper."""
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    flops, H, W = _embed_flops(model.patch_embed, H, W)
    for stage in model.layers:
        flops += sum(_block_flops(block, H * W) for block in stage.blocks)
        if stage.downsample is not None:
            f, H, W = _embed_flops(stage.downsample, H, W)
            flops += f
    flops += H * W * model.num_features                 # final norm
    if isinstance(model.head, nn.Linear):
        flops += model.head.in_features * model.head.out_features
    return flops


def count_dense_flops(model, img_size: Union[int, Tuple[int, int]]) -> int:
    """Multiply-adds of a dense backbone (models.dense.FocalNetDense) on an ``img_size`` input,
    counted as count_flops counts: the stem and the stages on the padded grids (ceil at every
    stride), then one operation per element for each output norm instead of the final norm and head."""
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    flops, H, W = _embed_flops(model.patch_embed, H, W)
    for i, stage in enumerate(model.layers):
        flops += sum(_block_flops(block, H * W) for block in stage.blocks)
        if i in model.out_indices:
            flops += H * W * model.dims[i]
        if stage.downsample is not None:
            f, H, W = _embed_flops(stage.downsample, H, W)
            flops += f
    return flops
