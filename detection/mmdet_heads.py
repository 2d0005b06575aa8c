"""Mask R-CNN and Faster R-CNN as mmdetection runs the official FocalNet configs, on torchvision's
detectors.

torchvision's ``MaskRCNN`` / ``FasterRCNN`` hold the same layers as mmdetection's (so a released
checkpoint maps onto them, detection/checkpoint.py), but compute five things differently at test time
and several in training. The pieces here are torchvision's classes with mmdetection's arithmetic:

==========================  ===================================  =====================================
piece                       mmdetection (reproduced here)        stock torchvision
==========================  ===================================  =====================================
MMAnchorGenerator           base anchors not rounded, strides    base anchors rounded, stride = padded
                            fixed at 4..64                       size // grid (61 on P6 at 800 high)
MMBoxCoder                  dw, dh clamped on both sides to      upper clamp only; smooth-L1 targets
                            +-log(1000/16); deltas / stds        scaled by weights
MultiLevelRoIAlign          RoIAlign aligned=True, adaptive      MultiScaleRoIAlign: sampling_ratio=2,
                            sampling; level floor(log2(s/56))    not aligned
MMTransform (test time)     size int(x*s + 0.5), bilinear on     floor(x*s), bilinear on floats
                            uint8 exactly as OpenCV              after normalising
MMTransform.postprocess     masks pasted with grid_sample on     integer boxes padded by 1 px, > 0.5
                            float boxes, >= 0.5
MMRPN, MMRoIHeads (train)   L1 box losses, IoU matcher with      smooth-L1, low-quality matches with
                            min_pos_iou for low-quality matches  no minimum IoU, mask targets from an
                            mask targets: aligned RoIAlign of    unaligned RoIAlign, not binarised
                            the mask, >= 0.5
==========================  ===================================  =====================================

The test settings are the official configs': RPN top 1000 per level, NMS 0.7 per level, 1000 kept;
RoI score > 0.05, NMS 0.5 per class, 100 detections. tests/test_detection_mmdet.py compares all of this
with mmdetection 3.3 itself (fixtures made by tests/mmref/make_mmdet_fixtures.py).
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import clip_boxes_to_image, nms, roi_align

# The data preprocessor of the official configs: ImageNet statistics on 0-255 pixels.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
TEST_SCALE = (1333, 800)           # (longer side at most, shorter side at most)
SIZE_DIVISOR = 32
STRIDES = (4, 8, 16, 32, 64)       # RPN levels P2-P6; the RoI heads pool from the first four
WH_RATIO_CLIP = 16 / 1000          # dw, dh are clamped to +-|log(WH_RATIO_CLIP)|

# Official test and training settings (mmdetection's mask_rcnn_r50_fpn, which the FocalNet configs keep).
RPN_TEST = dict(pre_nms_top_n=1000, post_nms_top_n=1000, nms_thresh=0.7)
RPN_TRAIN = dict(pre_nms_top_n=2000, post_nms_top_n=1000, nms_thresh=0.7)
RCNN_TEST = dict(score_thresh=0.05, nms_thresh=0.5, detections_per_img=100, mask_thresh=0.5)


# ---- resizing and normalising (the test pipeline) ------------------------------------------------

def rescale_size(height: int, width: int, scale: Tuple[int, int] = TEST_SCALE) -> Tuple[int, int]:
    """The (height, width) a keep-ratio resize to ``scale`` gives: the factor fits the longer side in
    max(scale) and the shorter in min(scale); sizes are rounded half up, as mmcv's rescale_size."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


_COEF_BITS = 11  # OpenCV's fixed-point interpolation weights sum to 2**11


def _linear_taps(src: int, dst: int, clamp_weight: bool) -> Tuple[torch.Tensor, ...]:
    """For each output index: the two source indices and their integer weights, as OpenCV's
    INTER_LINEAR computes them for 8-bit images (centres aligned, weights rounded to 1/2048). Along
    x, a tap that falls before the first or on/after the last pixel gets weight (2048, 0); along y
    the weights are kept and only the row index is clamped (OpenCV treats the axes so)."""
    position = ((torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst) - 0.5).float()
    first = torch.floor(position)
    frac = position - first
    first = first.long()
    if clamp_weight:
        outside = (first < 0) | (first >= src - 1)
        frac = torch.where(outside, torch.zeros_like(frac), frac)
        first = torch.where(first < 0, torch.zeros_like(first), first)
    one = float(1 << _COEF_BITS)
    w0 = torch.round((1.0 - frac) * one).long()  # round half to even, as OpenCV's saturate_cast
    w1 = torch.round(frac * one).long()
    return first.clamp(0, src - 1), (first + 1).clamp(0, src - 1), w0, w1


def resize_uint8_bilinear(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A (C, H, W) uint8 image resized to ``size`` = (height, width) bit for bit as OpenCV's
    ``cv2.resize(..., INTER_LINEAR)`` on x86 (SIMD path), which mmcv's imresize calls: horizontal taps
    in integers, then the vertical blend in 16-bit fixed point, (((r0 >> 4) * b0) >> 16) +
    (((r1 >> 4) * b1) >> 16), rounded by (v + 2) >> 2. Checked against OpenCV 5.1 by the fixtures."""
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f'expected a (C, H, W) uint8 image; got {image.dtype} {tuple(image.shape)}')
    _, H, W = image.shape
    out_h, out_w = size
    if (out_h, out_w) == (H, W):
        return image.clone()
    x0, x1, a0, a1 = _linear_taps(W, out_w, clamp_weight=True)
    y0, y1, b0, b1 = _linear_taps(H, out_h, clamp_weight=False)
    pixels = image.long()
    rows = pixels[:, :, x0] * a0 + pixels[:, :, x1] * a1                   # (C, H, out_w)
    top = (((rows[:, y0] >> 4) * b0[:, None]) >> 16)
    bottom = (((rows[:, y1] >> 4) * b1[:, None]) >> 16)
    return ((top + bottom + 2) >> 2).clamp(0, 255).to(torch.uint8)


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                threshold: float = RCNN_TEST['mask_thresh']) -> torch.Tensor:
    """(N, M, M) mask probabilities pasted into an image of ``height`` x ``width`` at float ``boxes``
    (N, 4): each box's pixel centres are mapped into its mask and sampled bilinearly
    (``grid_sample``), over the box's region widened by one pixel (zero elsewhere), then ``>=
    threshold``. Returns (N, height, width) bool, mmdetection's pasting on the CPU."""
    out = torch.zeros(len(masks), height, width, dtype=torch.bool, device=masks.device)
    for i, (mask, box) in enumerate(zip(masks, boxes)):
        x0, y0, x1, y1 = box.tolist()
        left, top = max(int(math.floor(x0)) - 1, 0), max(int(math.floor(y0)) - 1, 0)
        right, bottom = min(int(math.ceil(x1)) + 1, width), min(int(math.ceil(y1)) + 1, height)
        if right <= left or bottom <= top:
            continue
        ys = torch.arange(top, bottom, device=masks.device, dtype=torch.float32) + 0.5
        xs = torch.arange(left, right, device=masks.device, dtype=torch.float32) + 0.5
        ys = (ys - box[1]) / (box[3] - box[1]) * 2 - 1
        xs = (xs - box[0]) / (box[2] - box[0]) * 2 - 1
        # A box of zero width or height maps everything to infinity; mmdetection samples the centre.
        ys = torch.where(torch.isinf(ys), torch.zeros_like(ys), ys)
        xs = torch.where(torch.isinf(xs), torch.zeros_like(xs), xs)
        grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)
        pasted = F.grid_sample(mask[None, None].float(), grid[None], align_corners=False)[0, 0]
        out[i, top:bottom, left:right] = pasted >= threshold
    return out


class MMTransform(GeneralizedRCNNTransform):
    """Resize, normalise and batch. At test time as mmdetection's pipeline: the image back to its
    8-bit pixels, resized to the test scale with OpenCV's integer bilinear, normalised on 0-255,
    padded to a multiple of 32. In training, torchvision's multi-scale resize (float bilinear) on
    the same statistics; targets are resized with it."""

    def __init__(self, train_sizes: Sequence[int], max_size: int, test_scale: Tuple[int, int] = TEST_SCALE):
        super().__init__(tuple(train_sizes), max_size, [m / 255 for m in PIXEL_MEAN],
                         [s / 255 for s in PIXEL_STD], size_divisible=SIZE_DIVISOR)
        self.test_scale = tuple(test_scale)

    def forward(self, images: List[torch.Tensor], targets=None):
        if self.training:
            return super().forward(images, targets)
        mean = torch.tensor(PIXEL_MEAN, device=images[0].device)[:, None, None]
        std = torch.tensor(PIXEL_STD, device=images[0].device)[:, None, None]
        prepared, sizes = [], []
        for image in images:
            # The loaders give x / 255 in float32; x / 255 * 255 rounds back to x exactly.
            pixels = (image * 255).round().clamp(0, 255).to(torch.uint8)
            size = rescale_size(*pixels.shape[-2:], scale=self.test_scale)
            resized = resize_uint8_bilinear(pixels.cpu(), size).to(image.device)
            prepared.append((resized.float() - mean) / std)
            sizes.append(size)
        batch = self.batch_images(prepared, size_divisible=self.size_divisible)
        return ImageList(batch, sizes), targets

    def postprocess(self, result: List[Dict[str, torch.Tensor]], image_shapes, original_image_sizes):
        if self.training:
            return result
        for det, (h, w), (oh, ow) in zip(result, image_shapes, original_image_sizes):
            factor = torch.tensor([w / ow, h / oh] * 2, dtype=torch.float32, device=det['boxes'].device)
            det['boxes'] = det['boxes'] / factor
            if 'masks' in det:
                pasted = paste_masks(det['masks'][:, 0], det['boxes'], oh, ow)
                det['masks'] = pasted[:, None].float()  # 0/1: any threshold in (0, 1] keeps them
        return result


# ---- anchors, box coding, matching ---------------------------------------------------------------

class MMAnchorGenerator(AnchorGenerator):
    """Anchors of ``scales`` x stride and aspect ``ratios`` (h / w) centred on (x * stride, y * stride),
    not rounded, at the fixed ``strides`` (torchvision rounds the base anchors and derives each
    stride from the padded image size). Same order: level, row, column, ratio."""

    def __init__(self, strides: Sequence[int] = STRIDES, scales: Sequence[float] = (8.0,),
                 ratios: Sequence[float] = (0.5, 1.0, 2.0)):
        nn.Module.__init__(self)
        self.strides = tuple(strides)
        self.scales, self.ratios = tuple(scales), tuple(ratios)
        self.sizes = tuple((s * scales[0],) for s in self.strides)
        self.aspect_ratios = (tuple(ratios),) * len(self.strides)
        self.cell_anchors = [self.base_anchors(s) for s in self.strides]

    def base_anchors(self, stride: int) -> torch.Tensor:
        h_ratios = torch.sqrt(torch.tensor(self.ratios))
        w_ratios = 1 / h_ratios
        scales = torch.tensor(self.scales)
        ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    def num_anchors_per_location(self) -> List[int]:
        return [len(self.scales) * len(self.ratios)] * len(self.strides)

    def forward(self, image_list: ImageList, feature_maps: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f'{len(feature_maps)} feature maps for {len(self.strides)} anchor strides')
        levels = []
        for fmap, stride, base in zip(feature_maps, self.strides, self.cell_anchors):
            h, w = fmap.shape[-2:]
            device = fmap.device
            xs = torch.arange(w, device=device).float() * stride
            ys = torch.arange(h, device=device).float() * stride
            yy, xx = torch.meshgrid(ys, xs, indexing='ij')
            shifts = torch.stack([xx.reshape(-1), yy.reshape(-1)] * 2, dim=1)
            levels.append((shifts[:, None, :] + base.to(device)[None]).reshape(-1, 4))
        anchors = torch.cat(levels)
        return [anchors for _ in range(len(image_list.image_sizes))]


class MMBoxCoder(BoxCoder):
    """mmdetection's DeltaXYWHBBoxCoder: deltas (dx, dy, dw, dh) / ``stds``, centres from (x1 + x2) / 2,
    dw and dh clamped on both sides. Decoded boxes are clipped by the caller (as torchvision does)."""

    def __init__(self, stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
        super().__init__(tuple(1 / s for s in stds), bbox_xform_clip=abs(math.log(WH_RATIO_CLIP)))
        self.stds = tuple(float(s) for s in stds)

    def encode_single(self, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        p_ctr = (proposals[:, :2] + proposals[:, 2:]) * 0.5
        p_wh = proposals[:, 2:] - proposals[:, :2]
        g_ctr = (reference_boxes[:, :2] + reference_boxes[:, 2:]) * 0.5
        g_wh = reference_boxes[:, 2:] - reference_boxes[:, :2]
        deltas = torch.cat([(g_ctr - p_ctr) / p_wh, torch.log(g_wh / p_wh)], dim=1)
        return deltas / deltas.new_tensor(self.stds)

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        boxes = boxes.to(rel_codes.dtype)
        n = rel_codes.shape[0]
        deltas = rel_codes.reshape(n, -1, 4) * rel_codes.new_tensor(self.stds)
        ctr = ((boxes[:, :2] + boxes[:, 2:]) * 0.5)[:, None]
        wh = (boxes[:, 2:] - boxes[:, :2])[:, None]
        dwh = deltas[..., 2:].clamp(min=-self.bbox_xform_clip, max=self.bbox_xform_clip)
        centre = ctr + wh * deltas[..., :2]
        size = wh * dwh.exp()
        return torch.cat([centre - size * 0.5, centre + size * 0.5], dim=-1).reshape(n, -1)


class MaxIoUMatcher(Matcher):
    """mmdetection's MaxIoUAssigner: positive at IoU >= high, negative below low, in between
    ignored; with ``match_low_quality``, every prediction that has a ground truth's highest IoU is
    assigned to that ground truth (the later one wins), if that IoU is at least ``min_pos_iou``.
    (torchvision assigns those to their own best match and has no minimum.)"""

    def __init__(self, high: float, low: float, min_pos_iou: float, match_low_quality: bool = True):
        super().__init__(high, low, allow_low_quality_matches=False)
        self.min_pos_iou, self.match_low_quality = min_pos_iou, match_low_quality

    def __call__(self, match_quality_matrix: torch.Tensor) -> torch.Tensor:
        matches = super().__call__(match_quality_matrix)
        if self.match_low_quality and match_quality_matrix.numel():
            best = match_quality_matrix.max(dim=1).values
            for gt in range(match_quality_matrix.shape[0]):
                if best[gt] >= self.min_pos_iou:
                    matches[match_quality_matrix[gt] == best[gt]] = gt
        return matches


# ---- losses (shared by training and the reference tests) -----------------------------------------

def rpn_sampled_loss(objectness: torch.Tensor, deltas: torch.Tensor, targets: torch.Tensor,
                     pos: torch.Tensor, neg: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The RPN's losses over sampled anchors (flat indices ``pos`` and ``neg``): binary cross-entropy
    averaged over the sample, L1 of the positives' deltas summed and divided by the sample size."""
    sampled = torch.cat([pos, neg])
    labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).to(objectness.dtype)
    count = max(sampled.numel(), 1)
    cls = F.binary_cross_entropy_with_logits(objectness[sampled], labels, reduction='sum') / count
    box = F.l1_loss(deltas[pos], targets[pos], reduction='sum') / count
    return cls, box


def box_head_loss(class_logits: torch.Tensor, box_regression: torch.Tensor, labels: torch.Tensor,
                  targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy averaged over the sampled RoIs; L1 of each positive's deltas for its own class,
    summed and divided by the number of sampled RoIs (mmdetection's BBoxHead.loss, L1Loss)."""
    cls = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    per_class = box_regression.reshape(len(labels), -1, 4)
    box = F.l1_loss(per_class[pos, labels[pos]], targets[pos], reduction='sum') / max(labels.numel(), 1)
    return cls, box


def mask_targets(gt_masks: torch.Tensor, rois: torch.Tensor, size: int,
                 padded_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Each RoI's ground-truth mask (``gt_masks`` already picked per RoI, (N, H, W)) cropped and
    resized to ``size`` x ``size`` by aligned, adaptive RoIAlign, then binarised at 0.5. As
    mmdetection's mask_target: the masks are zero-padded to the batch's ``padded_size`` and the RoIs
    clipped to it first (the head's features are pooled from the unclipped RoIs)."""
    if padded_size is not None:
        gt_masks = F.pad(gt_masks, (0, padded_size[1] - gt_masks.shape[-1], 0, padded_size[0] - gt_masks.shape[-2]))
    H, W = gt_masks.shape[-2:]
    rois = torch.stack([rois[:, 0].clamp(0, W), rois[:, 1].clamp(0, H),
                        rois[:, 2].clamp(0, W), rois[:, 3].clamp(0, H)], dim=1)
    boxes = torch.cat([torch.arange(len(rois), device=rois.device, dtype=rois.dtype)[:, None], rois], 1)
    crops = roi_align(gt_masks[:, None].to(rois.dtype), boxes, (size, size), 1.0, 0, True)[:, 0]
    return (crops >= 0.5).to(rois.dtype)


def mask_head_loss(mask_logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each positive RoI's own-class mask, averaged over all pixels."""
    if not len(labels):
        return mask_logits.sum() * 0
    own = mask_logits[torch.arange(len(labels), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(own, targets)


# ---- RPN and RoI heads ---------------------------------------------------------------------------

def batched_nms_mm(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float,
                   split: int = 10000) -> torch.Tensor:
    """NMS within each group, as mmcv's batched_nms orders it: under ``split`` boxes, one NMS over
    boxes offset per group (kept in the NMS's score order, ties in input order); from ``split`` on,
    one NMS per group, the union sorted by score. (torchvision switches strategy at 1000 boxes on the
    CPU, which orders equal scores differently.)"""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if len(boxes) < split:
        offsets = groups.to(boxes) * (boxes.max() + 1)
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(groups):
        members = torch.where(groups == group)[0]
        kept[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    keep = torch.where(kept)[0]
    return keep[scores[keep].argsort(descending=True)]


class MMRPN(RegionProposalNetwork):
    """torchvision's RPN (assignment, sampling) with mmdetection's proposal selection and losses."""

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        """Per level the ``pre_nms_top_n`` best anchors by sigmoid score (sorted, so that equal scores
        keep mmdetection's order), their boxes clipped, those of zero width or height dropped, NMS
        per level, the ``post_nms_top_n`` best kept."""
        scores_all = objectness.detach().reshape(len(proposals), -1).sigmoid()
        final_boxes, final_scores = [], []
        for boxes, scores, shape in zip(proposals, scores_all, image_shapes):
            picked_boxes, picked_scores, picked_levels = [], [], []
            for level, (b, sc) in enumerate(zip(boxes.split(num_anchors_per_level),
                                                scores.split(num_anchors_per_level))):
                ranked, order = sc.sort(descending=True)
                order = order[:self.pre_nms_top_n()]
                picked_boxes.append(b[order])
                picked_scores.append(ranked[:self.pre_nms_top_n()])
                picked_levels.append(torch.full_like(order, level))
            b, sc, lv = torch.cat(picked_boxes), torch.cat(picked_scores), torch.cat(picked_levels)
            b = clip_boxes_to_image(b, shape)
            valid = ((b[:, 2] - b[:, 0]) > 0) & ((b[:, 3] - b[:, 1]) > 0)
            b, sc, lv = b[valid], sc[valid], lv[valid]
            keep = batched_nms_mm(b, sc, lv, self.nms_thresh)[:self.post_nms_top_n()]
            final_boxes.append(b[keep])
            final_scores.append(sc[keep])
        return final_boxes, final_scores

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos))[0]
        neg = torch.where(torch.cat(neg))[0]
        return rpn_sampled_loss(objectness.flatten(), pred_bbox_deltas, torch.cat(regression_targets),
                                pos, neg)


class MultiLevelRoIAlign(nn.Module):
    """mmdetection's SingleRoIExtractor: each RoI pooled from level floor(log2(sqrt(wh) / 56 + 1e-6))
    (clamped to the levels) by RoIAlign with aligned=True and adaptive sampling."""

    def __init__(self, featmap_names: Sequence[str], output_size: int,
                 strides: Sequence[int] = STRIDES[:4], finest_scale: float = 56.0):
        super().__init__()
        self.featmap_names, self.output_size = list(featmap_names), (output_size, output_size)
        self.strides, self.finest_scale = tuple(strides), finest_scale

    def levels(self, rois: torch.Tensor) -> torch.Tensor:
        scale = torch.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))
        return torch.floor(torch.log2(scale / self.finest_scale + 1e-6)).clamp(0, len(self.strides) - 1).long()

    def forward(self, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                image_shapes=None) -> torch.Tensor:
        maps = [features[n] for n in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        out = maps[0].new_zeros(len(rois), maps[0].shape[1], *self.output_size)
        levels = self.levels(rois[:, 1:])
        for level, (fmap, stride) in enumerate(zip(maps, self.strides)):
            idx = torch.where(levels == level)[0]
            if len(idx):
                out[idx] = roi_align(fmap, rois[idx], self.output_size, 1.0 / stride, 0, True).to(out.dtype)
        return out


class MMRoIHeads(RoIHeads):
    """The box and mask heads with mmdetection's losses, mask targets and test-time post-processing
    (no minimum box size; masks are pasted by MMTransform.postprocess)."""

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        boxes_per_image = [len(p) for p in proposals]
        boxes_all = self.box_coder.decode(box_regression, proposals)
        scores_all = F.softmax(class_logits, -1)
        results = []
        for boxes, scores, shape in zip(boxes_all.split(boxes_per_image), scores_all.split(boxes_per_image),
                                        image_shapes):
            boxes = clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, scores.shape[1], device=scores.device).repeat(len(scores))
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms_mm(boxes, scores, labels, self.nms_thresh)[:self.detections_per_img]
            results.append((boxes[keep], scores[keep], labels[keep]))
        return results

    def forward(self, features, proposals, image_shapes, targets=None):
        losses: Dict[str, torch.Tensor] = {}
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        result: List[Dict[str, torch.Tensor]] = []
        if self.training:
            cls, box = box_head_loss(class_logits, box_regression, torch.cat(labels),
                                     torch.cat(regression_targets))
            losses.update(loss_classifier=cls, loss_box_reg=box)
        else:
            for boxes, scores, labels_ in self.postprocess_detections(class_logits, box_regression,
                                                                      proposals, image_shapes):
                result.append({'boxes': boxes, 'labels': labels_, 'scores': scores})
        if self.has_mask():
            if self.training:
                pos = [torch.where(l > 0)[0] for l in labels]
                rois = [p[i] for p, i in zip(proposals, pos)]
                logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, rois, image_shapes)))
                size = logits.shape[-1]
                padded = tuple(d * self.mask_roi_pool.strides[0] for d in features['0'].shape[-2:])
                gt = torch.cat([mask_targets(t['masks'][m[i]], r, size, padded)
                                for t, m, i, r in zip(targets, matched_idxs, pos, rois)])
                own = torch.cat([l[i] for l, i in zip(labels, pos)])
                losses['loss_mask'] = mask_head_loss(logits, own, gt)
            else:
                rois = [r['boxes'] for r in result]
                logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, rois, image_shapes)))
                probs = logits.sigmoid()
                for r, p in zip(result, probs.split([len(b) for b in rois])):
                    r['masks'] = p[torch.arange(len(p), device=p.device), r['labels']][:, None]
        return result, losses


# ---- the detectors -------------------------------------------------------------------------------

def build_rcnn(method: str, backbone: nn.Module, num_classes: int, *, train_sizes: Sequence[int],
               max_size: int, test_scale: Tuple[int, int] = TEST_SCALE, box_head_dim: int = 1024, mask_head_dim: int = 256,
               rpn_batch_size: int = 256, roi_batch_size: int = 512,
               score_thresh: float = RCNN_TEST['score_thresh'],
               detections_per_img: int = RCNN_TEST['detections_per_img']) -> nn.Module:
    """Mask R-CNN ('mask_rcnn') or Faster R-CNN ('faster_rcnn') on ``backbone`` (a module returning
    five maps '0', '1', '2', '3', 'pool' of ``out_channels``) for ``num_classes`` object classes
    (labels 1..K, 0 background), with the official configs' settings."""
    C = backbone.out_channels
    anchors = MMAnchorGenerator()
    rpn = MMRPN(anchors, RPNHead(C, anchors.num_anchors_per_location()[0]),
                fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=rpn_batch_size,
                positive_fraction=0.5,
                pre_nms_top_n=dict(training=RPN_TRAIN['pre_nms_top_n'], testing=RPN_TEST['pre_nms_top_n']),
                post_nms_top_n=dict(training=RPN_TRAIN['post_nms_top_n'], testing=RPN_TEST['post_nms_top_n']),
                nms_thresh=RPN_TEST['nms_thresh'])
    rpn.box_coder = MMBoxCoder()
    rpn.proposal_matcher = MaxIoUMatcher(0.7, 0.3, min_pos_iou=0.3)
    names = ['0', '1', '2', '3']
    classes = num_classes + 1
    roi_heads = MMRoIHeads(
        MultiLevelRoIAlign(names, 7), TwoMLPHead(C * 7 * 7, box_head_dim),
        FastRCNNPredictor(box_head_dim, classes),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=roi_batch_size, positive_fraction=0.25,
        bbox_reg_weights=None, score_thresh=score_thresh, nms_thresh=RCNN_TEST['nms_thresh'],
        detections_per_img=detections_per_img)
    roi_heads.box_coder = MMBoxCoder((0.1, 0.1, 0.2, 0.2))
    roi_heads.proposal_matcher = MaxIoUMatcher(0.5, 0.5, min_pos_iou=0.5)
    if method == 'mask_rcnn':
        roi_heads.mask_roi_pool = MultiLevelRoIAlign(names, 14)
        roi_heads.mask_head = MaskRCNNHeads(C, [mask_head_dim] * 4, 1)
        roi_heads.mask_predictor = MaskRCNNPredictor(mask_head_dim, mask_head_dim, classes)
    elif method != 'faster_rcnn':
        raise ValueError(f'build_rcnn builds mask_rcnn or faster_rcnn; got {method!r}')
    return GeneralizedRCNN(backbone, rpn, roi_heads, MMTransform(train_sizes, max_size, test_scale))
