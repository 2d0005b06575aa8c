"""Parameters and FLOPs of the segmentors as the FocalNet README's ADE20K table reports them.

The official numbers come from mmsegmentation's tools/get_flops.py: mmcv's get_model_complexity_info
on the whole model (parameters, with the auxiliary head) and on its inference pass (FLOPs, without
the auxiliary head, which does not run) at 3 x 512 x 2048. mmcv counts multiply-adds per module type:
convolutions (kernel x input channels per output element, plus the bias), linear layers (no bias),
norms (2 per element: normalise and scale), ReLU and pooling (1 per input element); what modules do
not do (element-wise products, GELU, interpolation, concatenation) counts nothing. The same
convention is followed here: the backbone analytically (its linear layers run through a shared
function, not as modules), the heads with forward hooks on a meta-device pass (shapes only).
"""
from typing import Sequence, Tuple

import torch
import torch.nn as nn

from models.dense import FocalNetDense

from .heads import ConvBNReLU
from .model import Segmentor


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def backbone_flops(backbone: FocalNetDense, size: Tuple[int, int]) -> int:
    """mmcv-counted multiply-adds of the dense FocalNet on a (H, W) input."""
    H, W = size
    p = backbone.patch_size
    stem = backbone.patch_embed
    H, W = _ceil_div(H, p), _ceil_div(W, p)   # the input is padded to a multiple of the patch
    C = stem.proj.out_channels
    flops = H * W * C * (stem.proj.in_channels * p * p + 1)
    flops += 2 * H * W * C if stem.norm is not None else 0
    for i, stage in enumerate(backbone.layers):
        N = H * W
        for block in stage.blocks:
            mod = block.modulation
            L = mod.focal_level
            flops += 2 * 2 * N * C                                  # norm1, norm2
            flops += N * C * (2 * C + L + 1)                        # f (linear: no bias counted)
            flops += sum(N * C * k * k for k in mod.kernel_sizes)   # depth-wise convs, no bias
            flops += N * C * (C + 1)                                # h: 1x1 conv with bias
            flops += N * C * C                                      # proj
            flops += 2 * N * C * block.mlp.fc1.out_features         # fc1, fc2
            flops += 2 * N * C if hasattr(mod, 'ln') else 0
        if i in backbone.out_indices:
            flops += 2 * N * C                                      # output norm
        if stage.downsample is not None:
            H, W = _ceil_div(H, 2), _ceil_div(W, 2)                 # padded to even, 2x2 stride 2
            out = stage.downsample.proj.out_channels
            flops += H * W * out * (C * 4 + 1) + 2 * H * W * out
            C = out
    return flops


def _head_hook(counter: list):
    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            per_output = k * module.in_channels // module.groups + (1 if module.bias is not None else 0)
            counter[0] += output.numel() * per_output
        elif isinstance(module, nn.BatchNorm2d):
            counter[0] += 2 * inputs[0].numel()
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            counter[0] += inputs[0].numel()
        elif isinstance(module, ConvBNReLU):
            counter[0] += output.numel()                            # its ReLU
    return hook


def count_flops(model: Segmentor, size: Sequence[int] = (512, 2048)) -> int:
    """mmcv-counted multiply-adds of one inference pass (backbone and decode head) on a (H, W) input."""
    H, W = size
    counter = [0]
    handles = [m.register_forward_hook(_head_hook(counter)) for m in model.decode_head.modules()
               if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d, ConvBNReLU))]
    was_training = model.training
    model.eval()  # batch norm of a 1x1 pooled map needs running statistics
    try:
        with torch.no_grad():
            features = model.backbone(torch.zeros(1, 3, H, W, device='meta'))
            model.decode_head(features)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return backbone_flops(model.backbone, (H, W)) + counter[0]


# The FocalNet README's ADE20K table (UPerNet, 512x512 crops, 160k iterations): parameters (M, with
# the auxiliary head), GFLOPs (at 512 x 2048, without it), single-scale and multi-scale mIoU.
PAPER_ADE20K = {
    'upernet_focalnet_tiny_srf_160k': (61, 944, 46.5, 47.2),
    'upernet_focalnet_tiny_lrf_160k': (61, 949, 46.8, 47.8),
    'upernet_focalnet_small_srf_160k': (83, 1035, 49.3, 50.1),
    'upernet_focalnet_small_lrf_160k': (84, 1044, 49.1, 50.1),
    'upernet_focalnet_base_srf_160k': (124, 1180, 50.2, 51.1),
    'upernet_focalnet_base_lrf_160k': (126, 1192, 50.5, 51.4),
}
TABLE_SIZE = (512, 2048)
CONFIG_DIR = 'configs/segmentation'


def table_rows(names: Sequence[str], root) -> list:
    """One row per config name (configs/segmentation/<name>.yaml under ``root``): our parameters and
    FLOPs at TABLE_SIZE next to the README's values."""
    import os
    from config import load_config
    from .model import build_segmentor
    rows = []
    for name in names:
        config = load_config(os.path.join(root, CONFIG_DIR, f'{name}.yaml'))
        with torch.device('meta'):  # counting needs shapes only
            model = build_segmentor(config)
        params, gflops, miou, miou_ms = PAPER_ADE20K.get(name, (None,) * 4)
        rows.append(dict(config=name, params_m=count_params(model) / 1e6,
                         gflops=count_flops(model, TABLE_SIZE) / 1e9, img_size=list(TABLE_SIZE),
                         paper_params_m=params, paper_gflops=gflops, paper_miou=miou, paper_miou_ms=miou_ms))
    return rows


def table_lines(rows: list) -> list:
    def fmt(v, spec):
        return '-' if v is None else format(v, spec)
    lines = [f'UPerNet on ADE20K. Parameters with the auxiliary head; FLOPs (multiply-adds, counted as '
             f'mmcv counts them) of inference without it at {TABLE_SIZE[0]} x {TABLE_SIZE[1]}, as the '
             f'paper\'s table. Paper values: the FocalNet README.', '',
             '| model | params (M) | paper | GFLOPs | paper | mIoU (paper) | mIoU MS (paper) |',
             '|---|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        lines.append(f'| {r["config"]} | {r["params_m"]:.1f} | {fmt(r["paper_params_m"], "d")} | '
                     f'{r["gflops"]:.0f} | {fmt(r["paper_gflops"], "d")} | {fmt(r["paper_miou"], ".1f")} | '
                     f'{fmt(r["paper_miou_ms"], ".1f")} |')
    return lines
