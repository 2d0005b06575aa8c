"""Cascade Mask R-CNN (Cai & Vasconcelos 2018) on the FocalNet dense backbone, as mmdetection runs the
official config.

Backbone stages 0-3 -> FPN (P2-P6, P6 a stride-2 pool of P5) -> RPN (3 anchors per location) ->
three box stages, each RoIAlign 7x7 -> 4 x (3x3 conv, BN, ReLU) -> one 1024-wide FC -> class logits
and class-specific deltas (target stds halved from stage to stage), and three mask heads on 14x14 RoIs.

Training: RPN anchors matched at IoU 0.7 / 0.3 (and each box's best anchors), 256 sampled; proposals
(2000 per level before NMS 0.7, 2000 kept); per stage the boxes join the proposals, IoU >= 0.5 / 0.6
/ 0.7 is positive, 512 sampled with a quarter positives; cross-entropy and GIoU (x10) on the decoded
class-specific boxes; stage weights 1, 0.5, 0.25; the next stage's RoIs are this stage's regressed
by class (the true class for positives, the argmax for the rest; added boxes left out).
Test: 1000 proposals; RoIs refined between stages by the argmax class's deltas (clipped); the three
stages' logits averaged before the softmax; boxes from the last stage; per-class NMS 0.5 over scores
> 0.05, 100 kept; masks the mean of the three mask heads' sigmoids, pasted with grid_sample, >= 0.5.

Parameter names are mmdetection's (``backbone``, ``neck``, ``rpn_head``, ``roi_head.bbox_head.{i}``,
``roi_head.mask_head.{i}``).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss, roi_align

from models.dense import FocalNetDense

from .layers import (FPN, Batch, BatchDetector, ConvNormAct, ResizeNormalizePad, batched_nms, decode_deltas,
                     encode_deltas, grid_anchors, valid_flags)

EPS = torch.finfo(torch.float32).eps
STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


def _mean(loss_sum: torch.Tensor, count: float) -> torch.Tensor:
    """mmdetection's average: a sum over (count + float32 eps)."""
    return loss_sum / (count + EPS)


# ---- assignment and sampling -------------------------------------------------------------------

def max_iou_assign(priors: torch.Tensor, gt_boxes: torch.Tensor, pos_thr: float, neg_thr: float,
                   min_pos_iou: float, low_quality: bool) -> torch.Tensor:
    """mmdetection's MaxIoUAssigner: per prior the 0-based box index, -1 for background, -2 for
    neither (between the thresholds). With ``low_quality`` each box also takes every prior that
    overlaps it as much as its best one does (if at least ``min_pos_iou``)."""
    assigned = torch.full((len(priors),), -2, dtype=torch.long, device=priors.device)
    if len(gt_boxes) == 0:
        assigned[:] = -1
        return assigned
    overlaps = box_iou(gt_boxes, priors)                        # (G, P)
    best, which = overlaps.max(dim=0)
    assigned[(best >= 0) & (best < neg_thr)] = -1
    pos = best >= pos_thr
    assigned[pos] = which[pos]
    if low_quality:
        gt_best = overlaps.max(dim=1)[0]
        for i in range(len(gt_boxes)):
            if gt_best[i] >= min_pos_iou:
                assigned[overlaps[i] == gt_best[i]] = i
    return assigned


def random_sample(assigned: torch.Tensor, num: int, pos_fraction: float,
                  generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """mmdetection's RandomSampler: at most num x pos_fraction positives, negatives to fill ``num``."""
    pos = (assigned >= 0).nonzero().view(-1)
    neg = (assigned == -1).nonzero().view(-1)
    n_pos = int(num * pos_fraction)
    if len(pos) > n_pos:
        pos = pos[torch.randperm(len(pos), generator=generator, device='cpu')[:n_pos].to(pos.device)]
    n_neg = num - len(pos)
    if len(neg) > n_neg:
        neg = neg[torch.randperm(len(neg), generator=generator, device='cpu')[:n_neg].to(neg.device)]
    return pos, neg


# ---- RPN ---------------------------------------------------------------------------------------

def rpn_base_anchors(stride: int, ratios=(0.5, 1.0, 2.0), scales=(8.0,), device=None) -> torch.Tensor:
    """mmdetection's base anchors of one level (centre 0, ratio-major), (len(ratios) * len(scales), 4)."""
    ratios = torch.tensor(ratios, device=device)
    scales = torch.tensor(scales, device=device)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (stride * h_ratios[:, None] * scales[None, :]).view(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


class RPNHead(nn.Module):
    """mmdetection's RPNHead: rpn_conv (3x3, ReLU), rpn_cls (one sigmoid logit per anchor), rpn_reg."""

    def __init__(self, in_channels: int, strides: Sequence[int] = (4, 8, 16, 32, 64), num_anchors: int = 3):
        super().__init__()
        self.strides = tuple(strides)
        self.rpn_conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(in_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):  # mmdetection: N(0, 0.01), zero bias
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats):
        outs = [F.relu(self.rpn_conv(x)) for x in feats]
        return [self.rpn_cls(x) for x in outs], [self.rpn_reg(x) for x in outs]

    def anchors(self, sizes, device) -> List[torch.Tensor]:
        return [grid_anchors(rpn_base_anchors(s, device=device), size, s) for size, s in zip(sizes, self.strides)]

    @torch.no_grad()
    def proposals(self, cls_scores, bbox_preds, batch: Batch, nms_pre: int, max_per_img: int,
                  iou: float = 0.7) -> List[torch.Tensor]:
        """Per image the best boxes: per level the ``nms_pre`` highest scores, decoded and clipped,
        NMS within each level, ``max_per_img`` kept."""
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        level_anchors = self.anchors(sizes, cls_scores[0].device)
        out = []
        for i in range(len(batch.image_sizes)):
            boxes, scores, levels = [], [], []
            for lvl, (cls, reg, anchors) in enumerate(zip(cls_scores, bbox_preds, level_anchors)):
                s = cls[i].permute(1, 2, 0).reshape(-1).sigmoid()
                d = reg[i].permute(1, 2, 0).reshape(-1, 4)
                if nms_pre < len(s):
                    s, order = s.sort(descending=True)
                    s, order = s[:nms_pre], order[:nms_pre]
                    d, anchors = d[order], anchors[order]
                boxes.append(decode_deltas(anchors, d, (1.0, 1.0, 1.0, 1.0)))
                scores.append(s)
                levels.append(torch.full((len(s),), lvl, dtype=torch.long, device=s.device))
            boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
            h, w = batch.image_sizes[i]
            boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=h)
            wh = boxes[:, 2:] - boxes[:, :2]
            keep = (wh > 0).all(dim=1)
            boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
            keep = batched_nms(boxes, scores, levels, iou)[:max_per_img]
            out.append(boxes[keep])
        return out

    def loss(self, cls_scores, bbox_preds, batch: Batch, num: int = 256, pos_fraction: float = 0.5,
             generator=None) -> Dict[str, torch.Tensor]:
        """Anchors inside the image matched at IoU 0.7 / 0.3 (low-quality matches kept), ``num``
        sampled; sigmoid cross-entropy and smooth L1 (beta 1/9) on the deltas, over the sampled count."""
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        anchors = torch.cat(self.anchors(sizes, cls_scores[0].device))
        A = cls_scores[0].shape[1]
        B = len(batch.image_sizes)
        cls_all = torch.cat([c.permute(0, 2, 3, 1).reshape(B, -1) for c in cls_scores], 1)
        reg_all = torch.cat([r.permute(0, 2, 3, 1).reshape(B, -1, 4) for r in bbox_preds], 1)
        cls_terms, reg_terms, count = [], [], 0
        for i in range(B):
            valid = torch.cat([valid_flags(size, s, batch.pad_shapes[i], A)
                               for size, s in zip(sizes, self.strides)]).to(anchors.device)
            h, w = batch.image_sizes[i]
            inside = valid & (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] < w) & (anchors[:, 3] < h)
            idx = inside.nonzero().view(-1)
            assigned = max_iou_assign(anchors[idx], batch.boxes[i], 0.7, 0.3, 0.3, True)
            pos, neg = random_sample(assigned, num, pos_fraction, generator)
            count += len(pos) + len(neg)
            target = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(cls_all)
            cls_terms.append(F.binary_cross_entropy_with_logits(
                cls_all[i, idx[torch.cat([pos, neg])]], target, reduction='sum'))
            if len(pos):
                deltas = encode_deltas(anchors[idx[pos]], batch.boxes[i][assigned[pos]], (1.0, 1.0, 1.0, 1.0))
                reg_terms.append(F.smooth_l1_loss(reg_all[i, idx[pos]], deltas, beta=1.0 / 9.0, reduction='sum'))
        loss_cls = _mean(sum(cls_terms), count)
        loss_bbox = _mean(sum(reg_terms), count) if reg_terms else reg_all.sum() * 0
        return {'loss_rpn_cls': loss_cls, 'loss_rpn_bbox': loss_bbox}


# ---- RoI heads ---------------------------------------------------------------------------------

def rois_of(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, 5) RoIs: image index, x1, y1, x2, y2."""
    return torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])


def roi_features(feats: Sequence[torch.Tensor], rois: torch.Tensor, strides: Sequence[int], size: int,
                 finest_scale: int = 56, sampling_ratio: int = 0) -> torch.Tensor:
    """mmdetection's SingleRoIExtractor: each RoI from level floor(log2(sqrt(area) / 56)) (clamped),
    RoIAlign with ``sampling_ratio`` samples a bin (0: adaptive), aligned."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(min=0, max=len(strides) - 1).long()
    out = feats[0].new_zeros(len(rois), feats[0].shape[1], size, size)
    for lvl, stride in enumerate(strides):
        inds = (levels == lvl).nonzero().view(-1)
        if len(inds):
            out[inds] = roi_align(feats[lvl], rois[inds], (size, size), spatial_scale=1.0 / stride,
                                  sampling_ratio=sampling_ratio, aligned=True)
        elif torch.is_grad_enabled():
            # A level no RoI reads still joins the graph (with a zero): otherwise, when nothing else
            # reads it (Sparse R-CNN has no RPN), its FPN convolution gets no gradient in this step
            # and distributed training stops, its ranks waiting for a gradient that never comes.
            out += feats[lvl].flatten()[0] * 0
    return out


class ConvFCBBoxHead(nn.Module):
    """mmdetection's ConvFCBBoxHead with 4 shared convolutions (BN) and 1 shared FC: names
    shared_convs.{i}.conv/bn, shared_fcs.0, fc_cls (K + 1, background last), fc_reg (K x 4)."""

    def __init__(self, num_classes: int, in_channels: int = 256, conv_channels: int = 256,
                 fc_channels: int = 1024, roi_size: int = 7, num_convs: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.shared_convs = nn.ModuleList(
            ConvNormAct(in_channels if i == 0 else conv_channels, conv_channels, 3, norm='bn')
            for i in range(num_convs))
        self.shared_fcs = nn.ModuleList([nn.Linear(conv_channels * roi_size * roi_size, fc_channels)])
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, num_classes * 4)
        # mmdetection's init: Xavier-uniform FC, N(0, 0.01) classifier, N(0, 0.001) regressor.
        nn.init.xavier_uniform_(self.shared_fcs[0].weight)
        nn.init.zeros_(self.shared_fcs[0].bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        for conv in self.shared_convs:
            x = conv(x)
        x = F.relu(self.shared_fcs[0](x.flatten(1)))
        return self.fc_cls(x), self.fc_reg(x)


def class_deltas(bbox_pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The 4 deltas of each RoI's class from the class-specific (N, K x 4) prediction."""
    return bbox_pred.view(len(bbox_pred), -1, 4)[torch.arange(len(bbox_pred), device=labels.device), labels]


class FCNMaskHead(nn.Module):
    """mmdetection's FCNMaskHead: convs.{i}.conv (3x3, ReLU), upsample (2x2 transposed, stride 2),
    conv_logits (one map per class)."""

    def __init__(self, num_classes: int, in_channels: int = 256, channels: int = 256, num_convs: int = 4):
        super().__init__()
        self.convs = nn.ModuleList(ConvNormAct(in_channels if i == 0 else channels, channels, 3)
                                   for i in range(num_convs))
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)
        for m in (self.upsample, self.conv_logits):  # mmdetection: Kaiming-normal (fan out), zero bias
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """mmdetection's _do_paste_mask on the CPU: each (h, w) probability map sampled (grid_sample,
    bilinear) at the pixel centres of its box in a (height, width) image, within the region that
    bounds all boxes; (N, height, width) probabilities (0 outside that region)."""
    N = len(probs)
    out = probs.new_zeros(N, height, width)
    if N == 0:
        return out
    x0i, y0i = torch.clamp(boxes.min(dim=0).values.floor()[:2] - 1, min=0).to(torch.int32).tolist()
    x1i = int(torch.clamp(boxes[:, 2].max().ceil() + 1, max=width))
    y1i = int(torch.clamp(boxes[:, 3].max().ceil() + 1, max=height))
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    ys = torch.arange(y0i, y1i, device=probs.device).to(torch.float32) + 0.5
    xs = torch.arange(x0i, x1i, device=probs.device).to(torch.float32) + 0.5
    ys = (ys - y0) / (y1 - y0) * 2 - 1
    xs = (xs - x0) / (x1 - x0) * 2 - 1
    xs[torch.isinf(xs)] = 0
    ys[torch.isinf(ys)] = 0
    gx = xs[:, None, :].expand(N, ys.size(1), xs.size(1))
    gy = ys[:, :, None].expand(N, ys.size(1), xs.size(1))
    grid = torch.stack([gx, gy], dim=3)
    # One mask at a time, as mmdetection does on the CPU.
    for i in range(N):
        out[i, y0i:y1i, x0i:x1i] = F.grid_sample(probs[i:i + 1, None].float(), grid[i:i + 1],
                                                 align_corners=False)[0, 0]
    return out


class CascadeRoIHead(nn.Module):
    """Three box stages and three mask heads (``bbox_head.{i}``, ``mask_head.{i}``)."""

    def __init__(self, num_classes: int, channels: int, strides: Sequence[int] = (4, 8, 16, 32),
                 box_fc: int = 1024, stage_iou: Sequence[float] = (0.5, 0.6, 0.7),
                 stage_weights: Sequence[float] = (1.0, 0.5, 0.25), giou_weight: float = 10.0,
                 score_thr: float = 0.05, nms_iou: float = 0.5, max_per_img: int = 100,
                 num_samples: int = 512, pos_fraction: float = 0.25):
        super().__init__()
        self.num_classes, self.strides = num_classes, tuple(strides)
        self.stage_iou, self.stage_weights, self.giou_weight = tuple(stage_iou), tuple(stage_weights), giou_weight
        self.score_thr, self.nms_iou, self.max_per_img = score_thr, nms_iou, max_per_img
        self.num_samples, self.pos_fraction = num_samples, pos_fraction
        self.bbox_head = nn.ModuleList(ConvFCBBoxHead(num_classes, channels, channels, box_fc)
                                       for _ in STAGE_STDS)
        self.mask_head = nn.ModuleList(FCNMaskHead(num_classes, channels, channels) for _ in STAGE_STDS)

    def box_forward(self, stage: int, feats, rois):
        return self.bbox_head[stage](roi_features(feats, rois, self.strides, 7))

    def mask_forward(self, stage: int, feats, rois):
        return self.mask_head[stage](roi_features(feats, rois, self.strides, 14))

    # ---- test ----

    @torch.no_grad()
    def predict(self, feats, proposals: List[torch.Tensor], batch: Batch) -> List[Dict[str, torch.Tensor]]:
        counts = [len(p) for p in proposals]
        rois = rois_of(proposals)
        stage_scores = []
        for stage in range(len(STAGE_STDS)):
            cls, reg = self.box_forward(stage, feats, rois)
            stage_scores.append(cls)
            if stage < len(STAGE_STDS) - 1:
                refined = []
                for i, (r, c, d) in enumerate(zip(rois.split(counts), cls.split(counts), reg.split(counts))):
                    label = c[:, :-1].argmax(dim=1)
                    boxes = decode_deltas(r[:, 1:], class_deltas(d, label), STAGE_STDS[stage],
                                          max_shape=batch.image_sizes[i])
                    refined.append(torch.cat([r[:, :1], boxes], 1))
                rois = torch.cat(refined)
        cls = sum(stage_scores) / float(len(stage_scores))
        results = []
        for i, (r, c, d) in enumerate(zip(rois.split(counts), cls.split(counts), reg.split(counts))):
            results.append(self._boxes_of_image(r, c, d, batch.image_sizes[i]))
        self._masks(feats, results, batch)
        return results

    def _boxes_of_image(self, rois, cls, reg, image_size):
        scores = F.softmax(cls, dim=-1)[:, :-1]
        K = self.num_classes
        boxes = decode_deltas(rois[:, 1:].repeat_interleave(K, dim=0), reg.reshape(-1, 4), STAGE_STDS[-1],
                              max_shape=image_size)
        labels = torch.arange(K, device=cls.device).expand_as(scores).reshape(-1)
        scores = scores.reshape(-1)
        keep = (scores > self.score_thr).nonzero().view(-1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, self.nms_iou)[:self.max_per_img]
        return {'boxes': boxes[keep], 'scores': scores[keep], 'labels': labels[keep]}

    def _masks(self, feats, results, batch: Batch):
        """Masks of the detections in the original image: mean of the three heads' sigmoids at the
        detected class, pasted, >= 0.5; the boxes then go to the original image's pixels too."""
        counts = [len(r['boxes']) for r in results]
        rois = rois_of([r['boxes'] for r in results])
        if len(rois):
            probs = sum(self.mask_forward(s, feats, rois).sigmoid() for s in range(len(STAGE_STDS))) / 3.0
            probs = probs.split(counts)
        for i, r in enumerate(results):
            H, W = batch.original_sizes[i]
            sx, sy = batch.scale_factors[i]
            boxes = r['boxes'] / r['boxes'].new_tensor([sx, sy, sx, sy])
            if counts[i]:
                p = probs[i][torch.arange(counts[i]), r['labels']]
                r['masks'] = (paste_masks(p, boxes, H, W) >= 0.5).float()[:, None]
            else:
                r['masks'] = boxes.new_zeros(0, 1, H, W)
            r['boxes'] = boxes

    # ---- training ----

    def loss(self, feats, proposals: List[torch.Tensor], batch: Batch, generator=None) -> Dict[str, torch.Tensor]:
        losses = {}
        for stage in range(len(STAGE_STDS)):
            iou = self.stage_iou[stage]
            samples = []  # per image: rois, labels (K = background), target boxes, positive count, is-gt
            for i, boxes in enumerate(proposals):
                gts = batch.boxes[i]
                # The boxes join the proposals after the assignment, each assigned to itself.
                assigned = torch.cat([torch.arange(len(gts), device=gts.device),
                                      max_iou_assign(boxes, gts, iou, iou, iou, False)])
                priors = torch.cat([gts, boxes])
                pos, neg = random_sample(assigned, self.num_samples, self.pos_fraction, generator)
                labels = torch.cat([batch.labels[i][assigned[pos]],
                                    torch.full((len(neg),), self.num_classes, device=gts.device)])
                samples.append(dict(boxes=priors[torch.cat([pos, neg])], labels=labels,
                                    targets=gts[assigned[pos]], num_pos=len(pos), is_gt=pos < len(gts),
                                    gt_index=assigned[pos]))
            rois = rois_of([s['boxes'] for s in samples])
            labels = torch.cat([s['labels'] for s in samples])
            cls, reg = self.box_forward(stage, feats, rois)
            w = self.stage_weights[stage]
            loss_cls = _mean(F.cross_entropy(cls, labels, reduction='sum'), max(float(len(labels)), 1.0))
            pos_mask = labels < self.num_classes
            if pos_mask.any():
                decoded = decode_deltas(rois[pos_mask, 1:], class_deltas(reg[pos_mask], labels[pos_mask]),
                                        STAGE_STDS[stage])
                targets = torch.cat([s['targets'] for s in samples])
                giou = generalized_box_iou_loss(decoded, targets, reduction='sum', eps=1e-6)
                loss_bbox = self.giou_weight * _mean(giou, float(len(labels)))
            else:
                loss_bbox = reg[pos_mask].sum()
            # mmdetection's s{stage}.loss_cls ... named so that metrics.jsonl records them (loss_*).
            losses[f'loss_s{stage}_cls'] = loss_cls * w
            losses[f'loss_s{stage}_bbox'] = loss_bbox * w
            losses[f'loss_s{stage}_mask'] = self._mask_loss(stage, feats, samples, batch) * w
            if stage < len(STAGE_STDS) - 1:
                proposals = self._refine(stage, samples, rois, labels, cls, reg, batch)
        return losses

    def _mask_loss(self, stage, feats, samples, batch: Batch) -> torch.Tensor:
        pos_boxes = [s['boxes'][:s['num_pos']] for s in samples]
        if sum(len(b) for b in pos_boxes) == 0:
            return feats[0].sum() * 0
        rois = rois_of(pos_boxes)
        logits = self.mask_forward(stage, feats, rois)
        targets = []
        H, W = batch.tensor.shape[-2:]
        for i, s in enumerate(samples):
            if s['num_pos']:
                # The masks padded as the batch is (the sampling near the image's edge sees zeros).
                masks = F.pad(batch.masks[i][s['gt_index']].float()[:, None],
                              (0, W - batch.masks[i].shape[-1], 0, H - batch.masks[i].shape[-2]))
                boxes = torch.cat([torch.arange(s['num_pos'], device=masks.device)[:, None].float(),
                                   s['boxes'][:s['num_pos']]], 1)
                targets.append(roi_align(masks, boxes, (28, 28), 1.0, 0, aligned=True)[:, 0] >= 0.5)
        targets = torch.cat(targets).float()
        labels = torch.cat([s['labels'][:s['num_pos']] for s in samples])
        picked = logits[torch.arange(len(logits), device=logits.device), labels]
        return F.binary_cross_entropy_with_logits(picked, targets, reduction='mean')

    @torch.no_grad()
    def _refine(self, stage, samples, rois, labels, cls, reg, batch: Batch) -> List[torch.Tensor]:
        """The next stage's proposals: every sampled RoI but the added boxes, regressed by its class
        (positives: the true one; the rest: the argmax over the classes)."""
        labels = torch.where(labels == self.num_classes, cls[:, :-1].argmax(1), labels)
        out = []
        for i, s in enumerate(samples):
            inds = (rois[:, 0] == i).nonzero().view(-1)
            boxes = decode_deltas(rois[inds, 1:], class_deltas(reg[inds], labels[inds]), STAGE_STDS[stage],
                                  max_shape=batch.image_sizes[i])
            keep = torch.ones(len(inds), dtype=torch.bool, device=boxes.device)
            keep[:s['num_pos']] = ~s['is_gt']
            out.append(boxes[keep])
        return out


# The released checkpoints' keys are this model's: one table, prefix for prefix.
RELEASED_KEYS = {'backbone.': 'backbone.', 'neck.': 'neck.', 'rpn_head.': 'rpn_head.', 'roi_head.': 'roi_head.'}


class CascadeMaskRCNN(BatchDetector):
    """Backbone, FPN, RPN, cascade RoI head; ``forward(images, targets)`` as torchvision's detectors
    (targets with ``masks``); per image ``boxes``/``scores``/``labels`` (1..K)/``masks`` (N, 1, H, W)."""
    with_masks = True
    released_keys = RELEASED_KEYS

    def __init__(self, backbone: FocalNetDense, num_classes: int, transform: ResizeNormalizePad,
                 fpn_channels: int = 256, box_fc: int = 1024, score_thr: float = 0.05, max_per_img: int = 100,
                 rpn_samples: int = 256, roi_samples: int = 512, train_proposals: int = 2000,
                 test_proposals: int = 1000):
        super().__init__()
        self.backbone = backbone
        self.neck = FPN(backbone.out_channels, fpn_channels, num_outs=5, extra='pool')
        self.rpn_head = RPNHead(fpn_channels)
        self.roi_head = CascadeRoIHead(num_classes, fpn_channels, box_fc=box_fc, score_thr=score_thr,
                                       max_per_img=max_per_img, num_samples=roi_samples)
        self.transform = transform
        self.rpn_samples = rpn_samples
        self.train_proposals, self.test_proposals = train_proposals, test_proposals

    def features(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        return self.neck(self.backbone(tensor))

    def loss_batch(self, batch: Batch, generator=None) -> Dict[str, torch.Tensor]:
        feats = self.features(batch.tensor)
        cls, reg = self.rpn_head(feats)
        losses = self.rpn_head.loss(cls, reg, batch, self.rpn_samples, generator=generator)
        proposals = self.rpn_head.proposals(cls, reg, batch, self.train_proposals, self.train_proposals)
        losses.update(self.roi_head.loss(feats[:4], proposals, batch, generator))
        return losses

    def predict_batch(self, batch: Batch) -> List[Dict[str, torch.Tensor]]:
        feats = self.features(batch.tensor)
        cls, reg = self.rpn_head(feats)
        proposals = self.rpn_head.proposals(cls, reg, batch, self.test_proposals, self.test_proposals)
        results = self.roi_head.predict(feats[:4], proposals, batch)
        for r in results:
            r['labels'] = r['labels'] + 1
        return results

    def heads_for_cost(self, maps: Sequence[torch.Tensor], rois: int = 1000, mask_rois: int = 100):
        """What mmdetection's get_flops runs after the backbone: the neck, the RPN head on every level,
        each stage's box head on 1000 RoIs and mask head on 100."""
        feats = self.neck(maps)
        self.rpn_head(feats)
        C = self.neck.out_channels
        for stage in range(len(STAGE_STDS)):
            self.roi_head.bbox_head[stage](torch.empty(rois, C, 7, 7, device=maps[0].device))
            self.roi_head.mask_head[stage](torch.empty(mask_rois, C, 14, 14, device=maps[0].device))


def build_cascade_mask_rcnn(config, num_classes: int) -> CascadeMaskRCNN:
    """Cascade Mask R-CNN on the dense backbone (stages 0-3) that ``config`` describes."""
    from models.dense import build_dense_backbone
    d = config.DETECTION
    transform = ResizeNormalizePad(d.MIN_SIZE_TRAIN, d.MIN_SIZE_TEST, d.MAX_SIZE)
    return CascadeMaskRCNN(build_dense_backbone(config, (0, 1, 2, 3)), num_classes, transform, d.FPN_CHANNELS,
                           d.BOX_HEAD_DIM, d.SCORE_THRESH, d.DETECTIONS_PER_IMAGE, d.RPN_BATCH_SIZE,
                           d.ROI_BATCH_SIZE)
