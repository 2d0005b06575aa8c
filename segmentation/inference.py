"""Prediction for one image at its own size: whole-image or sliding-window passes, at one or several
scales, with or without flipping, as mmsegmentation's test modes.

Per scale ratio r the image is fitted into ``scale`` x r (long edge, short edge; bilinear), run through
the model whole or in windows, and the logits resized back to the image's size; the class
probabilities (softmax) of every scale and flip are averaged.
"""
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import resize
from .transforms import normalize, rescale_size


def slide_logits(model: nn.Module, x: torch.Tensor, num_classes: int, crop: int, stride: int) -> torch.Tensor:
    """Logits of overlapping ``crop`` windows placed every ``stride`` pixels (the last window of a row
    or column flush with the edge), averaged where they overlap."""
    _, _, H, W = x.shape
    rows = max(H - crop + stride - 1, 0) // stride + 1
    cols = max(W - crop + stride - 1, 0) // stride + 1
    logits = x.new_zeros((x.shape[0], num_classes, H, W), dtype=torch.float32)
    counts = x.new_zeros((1, 1, H, W), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, H), min(c * stride + crop, W)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits[:, :, y1:y2, x1:x2] += model(x[:, :, y1:y2, x1:x2]).float()
            counts[:, :, y1:y2, x1:x2] += 1
    return logits / counts


@torch.inference_mode()
def predict_probs(model: nn.Module, image: torch.Tensor, *, scale: Sequence[int], ratios: Sequence[float] = (1.0,),
                  flip: bool = False, mode: str = 'whole', crop: int = 512, stride: int = 341,
                  autocast: Callable = nullcontext) -> torch.Tensor:
    """Class probabilities (B, K, H, W) of uint8 images (B, 3, H, W), averaged over ``ratios`` and,
    with ``flip``, their mirror images."""
    H, W = image.shape[-2:]
    num_classes = model.num_classes
    probs, passes = None, 0
    for ratio in ratios:
        size = rescale_size(H, W, [int(s * ratio) for s in scale])
        x = normalize(F.interpolate(image.float(), size=size, mode='bilinear', align_corners=False))
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            with autocast():
                logits = model(xi) if mode == 'whole' else slide_logits(model, xi, num_classes, crop, stride)
            logits = resize(logits.float(), (H, W))
            p = logits.softmax(dim=1)
            p = p.flip(-1) if flipped else p
            probs = p if probs is None else probs + p
            passes += 1
    return probs / passes


def predict(model: nn.Module, image: torch.Tensor, **kwargs) -> torch.Tensor:
    """Class indices (B, H, W) of uint8 images (B, 3, H, W); options as :func:`predict_probs`."""
    return predict_probs(model, image, **kwargs).argmax(dim=1)
