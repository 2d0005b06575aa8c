"""ATSS (Zhang et al. 2020) on the FocalNet dense backbone, as mmdetection runs the official config.

Backbone stages 1-3 -> FPN with two extra stride-2 convolutions on its own outputs (P3-P7) -> a head
of 4 classification and 4 regression convolutions (GroupNorm, shared over levels), one square anchor
of 8 x stride per location, a learnable scale per level on the box deltas, and a centre-ness branch.

Training: Adaptive Training Sample Selection (per level the 9 anchors nearest each box's centre; the
positives are those with IoU >= mean + std of the candidates' IoUs whose centre lies inside the box;
an anchor claimed twice goes to the box it overlaps most), sigmoid focal loss, GIoU loss on decoded
boxes weighted by the centre-ness target, and binary cross-entropy on centre-ness.
Test: per level the 1000 best (anchor, class) sigmoid scores above 0.05, boxes clipped to the image,
scores times the centre-ness, per-class NMS at 0.6, the best 100 (mmdetection 3.x's order of these
steps; 2.x picked its 1000 per level by score x centre-ness, whole anchors at a time).

Parameter names are mmdetection's (``backbone.*``, ``neck.*``, ``bbox_head.*``).
"""
import math
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from models.dense import FocalNetDense
from utils import all_reduce_mean

from .layers import (FPN, Batch, BatchDetector, ConvNormAct, ResizeNormalizePad, batched_nms, decode_deltas,
                     grid_anchors, square_anchor, to_original, valid_flags)

# mmdetection divides by (count + float32 eps) when averaging a loss.
EPS = torch.finfo(torch.float32).eps
INF = 100000000


class Scale(nn.Module):
    """A learnable scalar multiplier (mmcv's Scale, parameter ``scale``)."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def atss_assign(anchors: torch.Tensor, level_counts: Sequence[int], gt_boxes: torch.Tensor,
                topk: int = 9) -> torch.Tensor:
    """Index of the assigned box (0-based) per anchor, -1 for background."""
    num_anchors, num_gt = len(anchors), len(gt_boxes)
    assigned = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return assigned
    overlaps = box_iou(anchors, gt_boxes)                                    # (A, G)
    gt_c = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2.0
    an_c = (anchors[:, :2] + anchors[:, 2:]) / 2.0
    distances = (an_c[:, None, :] - gt_c[None, :, :]).pow(2).sum(-1).sqrt()  # (A, G)
    candidates, start = [], 0
    for count in level_counts:
        k = min(topk, count)
        _, idx = distances[start:start + count].topk(k, dim=0, largest=False)
        candidates.append(idx + start)
        start += count
    candidates = torch.cat(candidates, dim=0)                                # (C, G)
    cols = torch.arange(num_gt, device=anchors.device)
    cand_iou = overlaps[candidates, cols]
    threshold = cand_iou.mean(0) + cand_iou.std(0)
    is_pos = cand_iou >= threshold[None, :]
    cx, cy = an_c[candidates, 0], an_c[candidates, 1]                        # (C, G)
    inside = torch.stack([cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx,
                          gt_boxes[:, 3] - cy], dim=1).min(dim=1)[0] > 0.01
    is_pos &= inside
    # An anchor that is a positive of several boxes takes the one it overlaps most.
    claimed = torch.full_like(overlaps, -INF)
    rows, gts = candidates[is_pos], cols.expand_as(candidates)[is_pos]
    claimed[rows, gts] = overlaps[rows, gts]
    best, which = claimed.max(dim=1)
    assigned[best != -INF] = which[best != -INF]
    return assigned


def centerness_target(anchors: torch.Tensor, gts: torch.Tensor) -> torch.Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of each anchor centre in its box."""
    cx = (anchors[:, 2] + anchors[:, 0]) / 2
    cy = (anchors[:, 3] + anchors[:, 1]) / 2
    lr = torch.stack([cx - gts[:, 0], gts[:, 2] - cx], dim=1)
    tb = torch.stack([cy - gts[:, 1], gts[:, 3] - cy], dim=1)
    return torch.sqrt((lr.min(-1)[0] / lr.max(-1)[0]) * (tb.min(-1)[0] / tb.max(-1)[0]))


class ATSSHead(nn.Module):
    """mmdetection's ATSSHead (names: cls_convs, reg_convs, atss_cls, atss_reg, atss_centerness,
    scales)."""

    def __init__(self, num_classes: int, in_channels: int = 256, feat_channels: int = 256,
                 stacked_convs: int = 4, strides: Sequence[int] = (8, 16, 32, 64, 128),
                 octave_base_scale: int = 8, topk: int = 9, stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, giou_weight: float = 2.0,
                 nms_pre: int = 1000, score_thr: float = 0.05, nms_iou: float = 0.6, max_per_img: int = 100):
        super().__init__()
        self.num_classes, self.strides, self.stds = num_classes, tuple(strides), tuple(stds)
        self.octave_base_scale, self.topk = octave_base_scale, topk
        self.focal_alpha, self.focal_gamma, self.giou_weight = focal_alpha, focal_gamma, giou_weight
        self.nms_pre, self.score_thr, self.nms_iou, self.max_per_img = nms_pre, score_thr, nms_iou, max_per_img
        self.cls_convs = nn.ModuleList(
            ConvNormAct(in_channels if i == 0 else feat_channels, feat_channels, 3, norm='gn')
            for i in range(stacked_convs))
        self.reg_convs = nn.ModuleList(
            ConvNormAct(in_channels if i == 0 else feat_channels, feat_channels, 3, norm='gn')
            for i in range(stacked_convs))
        self.atss_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        # mmdetection's init: every convolution N(0, 0.01) with zero bias; the classifier's bias so
        # that every class starts at probability 0.01.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.atss_cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, feats: Sequence[torch.Tensor]):
        """Per level: class logits (B, K, H, W), scaled deltas (B, 4, H, W), centre-ness (B, 1, H, W)."""
        cls_scores, bbox_preds, centernesses = [], [], []
        for x, scale in zip(feats, self.scales):
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            cls_scores.append(self.atss_cls(cls_feat))
            bbox_preds.append(scale(self.atss_reg(reg_feat)).float())
            centernesses.append(self.atss_centerness(reg_feat))
        return cls_scores, bbox_preds, centernesses

    def anchors(self, sizes, device) -> List[torch.Tensor]:
        return [grid_anchors(square_anchor(self.octave_base_scale * s, device), size, s)
                for size, s in zip(sizes, self.strides)]

    # ---- training ----

    def targets(self, anchors: torch.Tensor, sizes, batch: Batch):
        """ATSS assignment for every image: class per anchor (K for background), which anchors count
        (those on the image's own padded area), and per image (index, positive anchors, their boxes)."""
        counts = [h * w for h, w in sizes]
        B, K = len(batch.image_sizes), self.num_classes
        labels = torch.full((B, len(anchors)), K, dtype=torch.long, device=anchors.device)
        label_weights = torch.zeros(B, len(anchors), device=anchors.device)
        pos_parts = []  # (image, anchor indices, assigned boxes)
        for i in range(B):
            valid = torch.cat([valid_flags(size, s, batch.pad_shapes[i])
                               for size, s in zip(sizes, self.strides)]).to(anchors.device)
            inside = valid.nonzero()[:, 0]
            level_inside = [int(v.sum()) for v in torch.split(valid, counts)]
            assigned = atss_assign(anchors[inside], level_inside, batch.boxes[i], self.topk)
            label_weights[i, inside] = 1.0
            pos = assigned >= 0
            idx = inside[pos]
            labels[i, idx] = batch.labels[i][assigned[pos]]
            pos_parts.append((i, idx, batch.boxes[i][assigned[pos]]))
        return labels, label_weights, pos_parts

    def loss(self, outs, batch: Batch) -> Dict[str, torch.Tensor]:
        cls_scores, bbox_preds, centernesses = outs
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        anchors = torch.cat(self.anchors(sizes, cls_scores[0].device))
        B, K = len(batch.image_sizes), self.num_classes
        flat = lambda xs, c: torch.cat([x.permute(0, 2, 3, 1).reshape(B, -1, c) for x in xs], dim=1)
        cls_all, reg_all, ctr_all = flat(cls_scores, K), flat(bbox_preds, 4), flat(centernesses, 1)[..., 0]

        labels, label_weights, pos_parts = self.targets(anchors, sizes, batch)
        num_pos = sum(len(idx) for _, idx, _ in pos_parts)
        avg_factor = float(all_reduce_mean(torch.tensor(float(num_pos), device=anchors.device)))

        onehot = F.one_hot(labels, K + 1)[..., :K].to(cls_all.dtype)
        focal = sigmoid_focal_loss(cls_all, onehot, self.focal_alpha, self.focal_gamma, reduction='none')
        loss_cls = (focal * label_weights[..., None]).sum() / (avg_factor + EPS)

        if num_pos:
            img = torch.cat([torch.full_like(idx, i) for i, idx, _ in pos_parts])
            idx = torch.cat([idx for _, idx, _ in pos_parts])
            targets = torch.cat([t for _, _, t in pos_parts])
            pos_anchors = anchors[idx]
            ctr_t = centerness_target(pos_anchors, targets)
            decoded = decode_deltas(pos_anchors, reg_all[img, idx], self.stds)
            giou = generalized_box_iou_loss(decoded, targets, reduction='none', eps=1e-6)
            bbox_avg = all_reduce_mean(ctr_t.sum().detach()).clamp(min=1).item()
            loss_bbox = self.giou_weight * (giou * ctr_t).sum() / (1.0 + EPS) / bbox_avg
            loss_ctr = F.binary_cross_entropy_with_logits(ctr_all[img, idx], ctr_t, reduction='sum') / (
                avg_factor + EPS)
        else:
            loss_bbox = reg_all.sum() * 0
            loss_ctr = ctr_all.sum() * 0
        return {'loss_cls': loss_cls, 'loss_bbox': loss_bbox, 'loss_centerness': loss_ctr}

    # ---- test ----

    @torch.no_grad()
    def predict(self, outs, batch: Batch) -> List[Dict[str, torch.Tensor]]:
        """Per image: ``boxes`` (in the original image's pixels), ``scores``, ``labels`` (0..K-1)."""
        cls_scores, bbox_preds, centernesses = outs
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        level_anchors = self.anchors(sizes, cls_scores[0].device)
        results = []
        for i in range(len(batch.image_sizes)):
            boxes, scores, labels, factors = [], [], [], []
            for cls, reg, ctr, anchors in zip(cls_scores, bbox_preds, centernesses, level_anchors):
                prob = cls[i].permute(1, 2, 0).reshape(-1, self.num_classes).sigmoid()
                keep = prob > self.score_thr
                values = prob[keep]
                where = keep.nonzero()
                values, order = values.sort(descending=True)
                n = min(self.nms_pre, len(where))
                values, where = values[:n], where[order[:n]]
                anchor_idx, label = where.unbind(dim=1)
                boxes.append(decode_deltas(anchors[anchor_idx], reg[i].permute(1, 2, 0).reshape(-1, 4)[anchor_idx],
                                           self.stds))
                scores.append(values), labels.append(label)
                factors.append(ctr[i].permute(1, 2, 0).reshape(-1).sigmoid()[anchor_idx])
            boxes = torch.cat(boxes)
            h, w = batch.image_sizes[i]
            boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=h)
            boxes = to_original(boxes, batch.scale_factors[i])
            scores, labels = torch.cat(scores) * torch.cat(factors), torch.cat(labels)
            wh = boxes[:, 2:] - boxes[:, :2]
            keep = (wh > 0).all(dim=1)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_iou)[:self.max_per_img]
            results.append({'boxes': boxes[keep], 'scores': scores[keep], 'labels': labels[keep]})
        return results


# The released checkpoints' keys are this model's: one table, prefix for prefix.
RELEASED_KEYS = {'backbone.': 'backbone.', 'neck.': 'neck.', 'bbox_head.': 'bbox_head.'}


class ATSS(BatchDetector):
    """Backbone, neck and head; ``forward(images, targets)`` as torchvision's detectors: images are
    (3, H, W) in [0, 1], targets ``boxes`` (x1y1x2y2 pixels) and ``labels`` (1..K); the losses in
    training, per image ``boxes``/``scores``/``labels`` (1..K) otherwise."""

    released_keys = RELEASED_KEYS

    def __init__(self, backbone: FocalNetDense, num_classes: int, transform: ResizeNormalizePad,
                 fpn_channels: int = 256, **head_kwargs):
        super().__init__()
        self.backbone = backbone
        self.neck = FPN(backbone.out_channels, fpn_channels, num_outs=5, extra='on_output')
        self.bbox_head = ATSSHead(num_classes, fpn_channels, fpn_channels, **head_kwargs)
        self.transform = transform

    def features(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        return self.neck(self.backbone(tensor))

    def loss_batch(self, batch: Batch) -> Dict[str, torch.Tensor]:
        return self.bbox_head.loss(self.bbox_head(self.features(batch.tensor)), batch)

    def predict_batch(self, batch: Batch) -> List[Dict[str, torch.Tensor]]:
        results = self.bbox_head.predict(self.bbox_head(self.features(batch.tensor)), batch)
        for r in results:
            r['labels'] = r['labels'] + 1
        return results

    def heads_for_cost(self, maps: Sequence[torch.Tensor]):
        """What mmdetection's get_flops runs after the backbone: the neck and the head on every level."""
        self.bbox_head(self.neck(maps))


def build_atss(config, num_classes: int) -> ATSS:
    """ATSS on the dense backbone (stages 1-3) that ``config`` describes, with the official test
    settings (score > DETECTION.SCORE_THRESH, DETECTION.DETECTIONS_PER_IMAGE kept)."""
    from models.dense import build_dense_backbone
    d = config.DETECTION
    if d.FPN_CHANNELS % 32:
        raise ValueError(f'DETECTION.FPN_CHANNELS must be a multiple of 32 for atss (its head uses group '
                         f'norm with 32 groups); got {d.FPN_CHANNELS}')
    transform = ResizeNormalizePad(d.MIN_SIZE_TRAIN, d.MIN_SIZE_TEST, d.MAX_SIZE)
    return ATSS(build_dense_backbone(config, (1, 2, 3)), num_classes, transform, d.FPN_CHANNELS,
                score_thr=d.SCORE_THRESH, max_per_img=d.DETECTIONS_PER_IMAGE)
