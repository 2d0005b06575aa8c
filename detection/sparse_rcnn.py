"""Sparse R-CNN (Sun et al. 2021) on the FocalNet dense backbone, as mmdetection runs the official config.

Backbone stages 0-3 -> FPN (P2-P5, no extra level) -> a fixed set of learned proposals (300 boxes,
stored as centre and size relative to the image, and 300 feature vectors) -> six ``DIIHead``
stages. Each stage pools every proposal's 7x7 RoI (RoIAlign, 2 samples a bin, aligned), lets the
proposals attend to each other (8-head self-attention), mixes each proposal's feature with its own
RoI through a dynamic instance interactive convolution (two 1x1 convolutions whose weights the
proposal feature generates), applies an FFN, then a classification and a regression branch (fully
connected layers without bias, LayerNorm, ReLU). The stage's deltas (stds 0.5, 0.5, 1, 1, no
clipping) refine the boxes the next stage pools from; the object features flow on.

Training: at every stage each image's proposals are matched one-to-one with its boxes by the
Hungarian algorithm (cost: focal 2, L1 of image-normalised corners 5, -GIoU 2); sigmoid focal loss
over all proposals (x2), L1 on normalised corners (x5) and GIoU loss (x2) on the matched ones, each
averaged over the number of matches. The boxes are detached between stages.
Test: the last stage's sigmoid scores, the best DETECTIONS_PER_IMAGE (proposal, class) pairs (300 in
the official config), no score threshold and no NMS.

Parameter names are mmdetection's (``backbone``, ``neck``, ``rpn_head.init_proposal_*``,
``roi_head.bbox_head.{i}.*``), so a released checkpoint loads through ``RELEASED_KEYS`` unchanged.
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from models.dense import FocalNetDense
from utils import all_reduce_mean

from .cascade_rcnn import roi_features, rois_of
from .layers import FPN, Batch, BatchDetector, ResizeNormalizePad, decode_deltas

# mmdetection divides by (count + float32 eps) when averaging a loss.
EPS = torch.finfo(torch.float32).eps
STDS = (0.5, 0.5, 1.0, 1.0)


# ---- the proposals -----------------------------------------------------------------------------

class EmbeddingRPNHead(nn.Module):
    """The learned proposals (mmdetection's EmbeddingRPNHead): ``init_proposal_bboxes`` as (cx, cy,
    w, h) relative to the image (initially the whole image), ``init_proposal_features``."""

    def __init__(self, num_proposals: int, channels: int):
        super().__init__()
        self.init_proposal_bboxes = nn.Embedding(num_proposals, 4)
        self.init_proposal_features = nn.Embedding(num_proposals, channels)
        nn.init.constant_(self.init_proposal_bboxes.weight[:, :2], 0.5)
        nn.init.constant_(self.init_proposal_bboxes.weight[:, 2:], 1.0)

    def forward(self, image_sizes: Sequence[Tuple[int, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Boxes (B, P, 4) in each image's resized pixels, features (B, P, C)."""
        weight = self.init_proposal_bboxes.weight
        whwh = weight.new_tensor([[w, h, w, h] for h, w in image_sizes])
        boxes = box_convert(weight, 'cxcywh', 'xyxy')[None] * whwh[:, None]
        features = self.init_proposal_features.weight[None].expand(len(image_sizes), -1, -1)
        return boxes, features


# ---- one stage ----------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """mmcv's MultiheadAttention without positions: x + attn(x, x, x), sequence first (names
    ``attn.in_proj_weight``, ``attn.out_proj``)."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(channels, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # need_weights=True (the default) is mmcv's call and takes the explicit-softmax path; the
        # fused one (False) rounds differently, which six stages of box refinement grow to 0.1 px.
        return x + self.attn(x, x, x)[0]


class FFN(nn.Module):
    """mmcv's FFN with two layers and the identity added (names ``layers.0.0``, ``layers.1``)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True)),
                                    nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class DynamicConv(nn.Module):
    """Dynamic instance interactive convolution: the proposal feature generates the weights of two
    1x1 convolutions (C -> feat -> C, each followed by LayerNorm and ReLU) applied to its own RoI's
    S x S features; the result is flattened and projected back to C (Linear, LayerNorm, ReLU)."""

    def __init__(self, channels: int, feat_channels: int, roi_size: int = 7):
        super().__init__()
        self.channels, self.feat_channels = channels, feat_channels
        self.dynamic_layer = nn.Linear(channels, 2 * channels * feat_channels)
        self.norm_in = nn.LayerNorm(feat_channels)
        self.norm_out = nn.LayerNorm(channels)
        self.fc_layer = nn.Linear(channels * roi_size ** 2, channels)
        self.fc_norm = nn.LayerNorm(channels)

    def forward(self, proposal_feat: torch.Tensor, roi_feat: torch.Tensor) -> torch.Tensor:
        """(N, C) proposal features, (N, C, S, S) RoI features -> (N, C)."""
        x = roi_feat.flatten(2).transpose(1, 2)                                  # (N, S*S, C)
        params = self.dynamic_layer(proposal_feat)
        n_in = self.channels * self.feat_channels
        param_in = params[:, :n_in].view(-1, self.channels, self.feat_channels)
        param_out = params[:, -n_in:].view(-1, self.feat_channels, self.channels)
        x = F.relu(self.norm_in(torch.bmm(x, param_in)))
        x = F.relu(self.norm_out(torch.bmm(x, param_out)))
        return F.relu(self.fc_norm(self.fc_layer(x.flatten(1))))


def _fc_stack(channels: int, count: int) -> nn.ModuleList:
    """``count`` x (Linear without bias, LayerNorm, ReLU), flat as mmdetection indexes them."""
    layers = []
    for _ in range(count):
        layers += [nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(inplace=True)]
    return nn.ModuleList(layers)


class DIIHead(nn.Module):
    """One Sparse R-CNN stage (mmdetection's DIIHead): self-attention over the proposals, the dynamic
    convolution with their RoIs, the FFN, then 1 classification and 3 regression FC layers."""

    def __init__(self, num_classes: int, channels: int = 256, num_heads: int = 8, ffn_channels: int = 2048,
                 dynamic_channels: int = 64, num_cls_fcs: int = 1, num_reg_fcs: int = 3):
        super().__init__()
        self.num_classes, self.channels = num_classes, channels
        self.attention = SelfAttention(channels, num_heads)
        self.attention_norm = nn.LayerNorm(channels)
        self.instance_interactive_conv = DynamicConv(channels, dynamic_channels)
        self.instance_interactive_conv_norm = nn.LayerNorm(channels)
        self.ffn = FFN(channels, ffn_channels)
        self.ffn_norm = nn.LayerNorm(channels)
        self.cls_fcs = _fc_stack(channels, num_cls_fcs)
        self.fc_cls = nn.Linear(channels, num_classes)
        self.reg_fcs = _fc_stack(channels, num_reg_fcs)
        self.fc_reg = nn.Linear(channels, 4)
        # mmdetection's init: Xavier-uniform for every matrix, the classifier's bias so that every
        # class starts at probability 0.01; vectors keep PyTorch's defaults.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.fc_cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, roi_feat: torch.Tensor, proposal_feat: torch.Tensor):
        """(B x P, C, 7, 7) RoIs, (B, P, C) proposal features -> class logits (B, P, K), deltas
        (B, P, 4), the new proposal features (B, P, C)."""
        B, P = proposal_feat.shape[:2]
        x = self.attention_norm(self.attention(proposal_feat.transpose(0, 1))).transpose(0, 1)
        x = x.reshape(-1, self.channels)
        x = self.instance_interactive_conv_norm(x + self.instance_interactive_conv(x, roi_feat))
        obj = self.ffn_norm(self.ffn(x))
        cls, reg = obj, obj
        for layer in self.cls_fcs:
            cls = layer(cls)
        for layer in self.reg_fcs:
            reg = layer(reg)
        return self.fc_cls(cls).view(B, P, -1), self.fc_reg(reg).view(B, P, 4), obj.view(B, P, -1)


# ---- matching -------------------------------------------------------------------------------------

def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                    image_size: Tuple[int, int], cls_weight: float = 2.0, l1_weight: float = 5.0,
                    giou_weight: float = 2.0, alpha: float = 0.25, gamma: float = 2.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """mmdetection's HungarianAssigner with FocalLossCost, BBoxL1Cost (corners divided by the image's
    width and height) and IoUCost (GIoU): (proposal indices, box indices) of the one-to-one match."""
    empty = torch.zeros(0, dtype=torch.long, device=logits.device)
    if len(gt_boxes) == 0 or len(boxes) == 0:
        return empty, empty
    p = logits.sigmoid()
    eps = 1e-12
    neg = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    pos = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    cls_cost = (pos[:, gt_labels] - neg[:, gt_labels]) * cls_weight
    h, w = image_size
    factor = boxes.new_tensor([w, h, w, h])[None]
    l1_cost = torch.cdist(boxes / factor, gt_boxes / factor, p=1) * l1_weight
    iou_cost = -generalized_box_iou(boxes, gt_boxes) * giou_weight
    cost = torch.stack([cls_cost, l1_cost, iou_cost]).sum(0)
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return (torch.as_tensor(rows, dtype=torch.long, device=logits.device),
            torch.as_tensor(cols, dtype=torch.long, device=logits.device))


# ---- the six stages -----------------------------------------------------------------------------

class SparseRoIHead(nn.Module):
    """The stages (``bbox_head.{i}``), each pooling 7x7 RoIs from P2-P5."""

    def __init__(self, num_classes: int, channels: int, num_stages: int = 6, strides: Sequence[int] = (4, 8, 16, 32),
                 ffn_channels: int = 2048, dynamic_channels: int = 64, max_per_img: int = 300,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 cls_weight: float = 2.0, l1_weight: float = 5.0, giou_weight: float = 2.0):
        super().__init__()
        self.num_classes, self.strides, self.max_per_img = num_classes, tuple(strides), max_per_img
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.cls_weight, self.l1_weight, self.giou_weight = cls_weight, l1_weight, giou_weight
        self.bbox_head = nn.ModuleList(
            DIIHead(num_classes, channels, ffn_channels=ffn_channels, dynamic_channels=dynamic_channels)
            for _ in range(num_stages))

    def stage(self, i: int, feats, boxes: torch.Tensor, features: torch.Tensor):
        """Stage ``i`` on (B, P, 4) boxes: logits (B, P, K), refined boxes (B, P, 4), features."""
        B, P = boxes.shape[:2]
        rois = rois_of(list(boxes))
        roi_feat = roi_features(feats, rois, self.strides, 7, sampling_ratio=2)
        cls, deltas, features = self.bbox_head[i](roi_feat, features)
        # Boxes and scores in float32 under autocast: half precision has 0.5 px steps at 1000 px.
        refined = decode_deltas(boxes.float().reshape(-1, 4), deltas.float().reshape(-1, 4), STDS).view(B, P, 4)
        return cls.float(), refined, features

    @torch.no_grad()
    def predict(self, feats, boxes: torch.Tensor, features: torch.Tensor, batch: Batch) -> List[Dict[str, torch.Tensor]]:
        for i in range(len(self.bbox_head)):
            cls, boxes, features = self.stage(i, feats, boxes, features)
        scores = cls.sigmoid()
        results = []
        for i in range(len(batch.image_sizes)):
            k = min(self.max_per_img, scores[i].numel())
            values, where = scores[i].flatten().topk(k)
            picked = boxes[i][where // self.num_classes]
            sx, sy = batch.scale_factors[i]
            results.append({'boxes': picked / picked.new_tensor([sx, sy, sx, sy]), 'scores': values,
                            'labels': where % self.num_classes})
        return results

    def loss(self, feats, boxes: torch.Tensor, features: torch.Tensor, batch: Batch) -> Dict[str, torch.Tensor]:
        whwh = boxes.new_tensor([[w, h, w, h] for h, w in batch.image_sizes])        # (B, 4)
        losses = {}
        for s in range(len(self.bbox_head)):
            cls, refined, features = self.stage(s, feats, boxes, features)
            losses.update({f'loss_s{s}_{k}': v for k, v in self.stage_loss(cls, refined, whwh, batch).items()})
            boxes = refined.detach()
        return losses

    def stage_loss(self, cls: torch.Tensor, boxes: torch.Tensor, whwh: torch.Tensor, batch: Batch):
        """One stage's {'cls', 'bbox', 'iou'} losses for its logits (B, P, K) and decoded boxes (B, P, 4),
        after matching them to each image's boxes; ``whwh`` (B, 4) normalises the L1 term."""
        B, P, K = cls.shape
        labels = torch.full((B, P), K, dtype=torch.long, device=cls.device)
        img, prop, targets = [], [], []
        for i in range(B):
            rows, cols = hungarian_match(cls[i].detach(), boxes[i].detach(), batch.boxes[i], batch.labels[i],
                                         batch.image_sizes[i], self.cls_weight, self.l1_weight, self.giou_weight,
                                         self.focal_alpha, self.focal_gamma)
            labels[i, rows] = batch.labels[i][cols]
            img.append(torch.full_like(rows, i)), prop.append(rows), targets.append(batch.boxes[i][cols])
        img, prop, targets = torch.cat(img), torch.cat(prop), torch.cat(targets)
        num_pos = float(all_reduce_mean(torch.tensor(float(len(prop)), device=cls.device)))
        # With no box in the whole batch mmdetection would divide by eps; one keeps the loss finite.
        avg = (num_pos if num_pos > 0 else 1.0) + EPS
        onehot = F.one_hot(labels, K + 1)[..., :K].to(cls.dtype)
        loss_cls = sigmoid_focal_loss(cls, onehot, self.focal_alpha, self.focal_gamma, reduction='sum') / avg
        if len(prop):
            pred = boxes[img, prop]
            norm = whwh[img]
            loss_l1 = (pred / norm - targets / norm).abs().sum() / avg
            loss_giou = generalized_box_iou_loss(pred, targets, reduction='sum', eps=1e-6) / avg
        else:
            loss_l1 = loss_giou = boxes.sum() * 0
        return {'cls': self.cls_weight * loss_cls, 'bbox': self.l1_weight * loss_l1, 'iou': self.giou_weight * loss_giou}


# The released checkpoints' keys are this model's: one table, prefix for prefix.
RELEASED_KEYS = {'backbone.': 'backbone.', 'neck.': 'neck.', 'rpn_head.': 'rpn_head.', 'roi_head.': 'roi_head.'}


class SparseRCNN(BatchDetector):
    """Backbone, FPN, learned proposals, six stages; ``forward(images, targets)`` as torchvision's
    detectors: the losses in training, per image ``boxes``/``scores``/``labels`` (1..K) otherwise."""

    released_keys = RELEASED_KEYS

    def __init__(self, backbone: FocalNetDense, num_classes: int, transform: ResizeNormalizePad,
                 fpn_channels: int = 256, num_proposals: int = 300, num_stages: int = 6,
                 ffn_channels: int = 2048, dynamic_channels: int = 64, max_per_img: int = 300):
        super().__init__()
        self.backbone = backbone
        # num_outs equals the inputs: the official 'on_input' extra convolutions never exist.
        self.neck = FPN(backbone.out_channels, fpn_channels, num_outs=len(backbone.out_channels), extra='on_output')
        self.rpn_head = EmbeddingRPNHead(num_proposals, fpn_channels)
        self.roi_head = SparseRoIHead(num_classes, fpn_channels, num_stages, ffn_channels=ffn_channels,
                                      dynamic_channels=dynamic_channels, max_per_img=max_per_img)
        self.transform = transform

    def features(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        return self.neck(self.backbone(tensor))

    def loss_batch(self, batch: Batch) -> Dict[str, torch.Tensor]:
        feats = self.features(batch.tensor)
        boxes, features = self.rpn_head(batch.image_sizes)
        return self.roi_head.loss(feats, boxes, features, batch)

    def predict_batch(self, batch: Batch) -> List[Dict[str, torch.Tensor]]:
        feats = self.features(batch.tensor)
        boxes, features = self.rpn_head(batch.image_sizes)
        results = self.roi_head.predict(feats, boxes, features, batch)
        for r in results:
            r['labels'] = r['labels'] + 1
        return results

    def heads_for_cost(self, maps: Sequence[torch.Tensor]):
        """What mmdetection's get_flops runs after the backbone: the neck, then every stage on the
        proposals' RoIs (one image)."""
        self.neck(maps)
        P = self.rpn_head.init_proposal_features.num_embeddings
        C = self.neck.out_channels
        device = maps[0].device
        features = torch.empty(1, P, C, device=device)
        for head in self.roi_head.bbox_head:
            _, _, features = head(torch.empty(P, C, 7, 7, device=device), features)


def build_sparse_rcnn(config, num_classes: int) -> SparseRCNN:
    """Sparse R-CNN on the dense backbone (stages 0-3) that ``config`` describes; DETECTION.SPARSE.*
    sizes its proposals and stages, DETECTION.DETECTIONS_PER_IMAGE its output (no score threshold)."""
    from models.dense import build_dense_backbone
    d, s = config.DETECTION, config.DETECTION.SPARSE
    for key in ('NUM_PROPOSALS', 'NUM_STAGES', 'FFN_CHANNELS', 'DYNAMIC_CHANNELS'):
        if s[key] < 1:
            raise ValueError(f'DETECTION.SPARSE.{key} must be positive; got {s[key]}')
    if d.FPN_CHANNELS % 8:
        raise ValueError(f'DETECTION.FPN_CHANNELS must be a multiple of 8 for sparse_rcnn (its stages use '
                         f'8-head attention); got {d.FPN_CHANNELS}')
    transform = ResizeNormalizePad(d.MIN_SIZE_TRAIN, d.MIN_SIZE_TEST, d.MAX_SIZE)
    return SparseRCNN(build_dense_backbone(config, (0, 1, 2, 3)), num_classes, transform, d.FPN_CHANNELS,
                      s.NUM_PROPOSALS, s.NUM_STAGES, s.FFN_CHANNELS, s.DYNAMIC_CHANNELS, d.DETECTIONS_PER_IMAGE)
