"""Fixtures for the ATSS, Cascade Mask R-CNN and Sparse R-CNN tests, made by mmdetection itself.

Run in the reference environment (requirements-mmref.txt), from the repository root:

    python tests/mmref/make_mmdet_fixtures_detmore.py atss cascade_mask_rcnn sparse_rcnn

For each method: the official config (the FocalNet repository's, in mmdetection 3.x's form) at small
widths, with random weights (every tensor perturbed off its initial value), saved as a released
checkpoint; mmdetection's own test pipeline (its resize) and ``test_step`` on two real photographs
(scikit-learn's sample images: one that the test scale resizes, one already at it); and the losses of
one training step on both images as one batch, with fixed boxes (with ATSS's assignment of every
anchor, and Sparse R-CNN's Hungarian match of every proposal at every stage). Torch runs on THREADS[method]
threads, as the tests compare. Written to tests/fixtures/mmdet/<method>.pt with the versions that
made it.
"""
import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tests'))

from mmref import shim  # noqa: E402

shim.install()

import mmcv  # noqa: E402
import mmdet  # noqa: E402
import mmengine  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import ConfigDict  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from mmref.backbone import register_focalnet  # noqa: E402

OUT = ROOT / 'tests' / 'fixtures' / 'mmdet'
# The test scale of the fixtures (the official one is (1333, 800); smaller keeps the files small).
TEST_SCALE = (400, 256)
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
# The tiny backbone every fixture uses: the official tiny model's focal windows and levels, narrower.
BACKBONE = dict(type='FocalNet', embed_dim=8, depths=[1, 1, 2, 1], mlp_ratio=4., drop_rate=0.,
                drop_path_rate=0., patch_norm=True, use_checkpoint=False, focal_windows=[11, 9, 9, 7],
                focal_levels=[2, 2, 2, 2], use_conv_embed=False)


def photos():
    """Two RGB crops of the sample photos: 240x360 (resized to 256x384 by the test scale) and
    256x320 (already at it)."""
    from sklearn.datasets import load_sample_images
    china, flower = load_sample_images().images
    return [np.ascontiguousarray(china[100:340, 150:510]), np.ascontiguousarray(flower[80:336, 200:520])]


# Fixed training targets, in the resized images' pixels (x1, y1, x2, y2) and mmdetection's labels.
GT_BOXES = [[[30., 40., 150., 200.], [200., 60., 370., 240.], [90., 100., 230., 180.]],
            [[50., 30., 200., 220.], [10., 10., 40., 50.]]]
GT_LABELS = [[3, 17, 3], [5, 0]]


def atss_config(num_classes=80):
    return dict(
        type='ATSS',
        data_preprocessor=dict(type='DetDataPreprocessor', mean=MEAN, std=STD, bgr_to_rgb=True,
                               pad_size_divisor=32),
        backbone=dict(BACKBONE, out_indices=(1, 2, 3)),
        neck=dict(type='FPN', in_channels=[16, 32, 64], out_channels=32, start_level=0,
                  add_extra_convs='on_output', num_outs=5),
        bbox_head=dict(
            type='ATSSHead', num_classes=num_classes, in_channels=32, stacked_convs=4, feat_channels=32,
            anchor_generator=dict(type='AnchorGenerator', ratios=[1.0], octave_base_scale=8,
                                  scales_per_octave=1, strides=[8, 16, 32, 64, 128]),
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0],
                            target_stds=[0.1, 0.1, 0.2, 0.2]),
            loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=dict(type='GIoULoss', loss_weight=2.0),
            loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)),
        train_cfg=dict(assigner=dict(type='ATSSAssigner', topk=9), allowed_border=-1, pos_weight=-1,
                       debug=False),
        test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05,
                      nms=dict(type='nms', iou_threshold=0.6), max_per_img=100))


def cascade_mask_rcnn_config(num_classes=80):
    """The official Cascade Mask R-CNN config; SyncBN as BN (one process). The samplers take every
    candidate (num far above the counts) so that the training step's losses are deterministic."""
    def box_head(stds):
        return dict(type='ConvFCBBoxHead', num_shared_convs=4, num_shared_fcs=1, in_channels=16,
                    conv_out_channels=16, fc_out_channels=32, roi_feat_size=7, num_classes=num_classes,
                    bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
                    reg_class_agnostic=False, reg_decoded_bbox=True, norm_cfg=dict(type='BN', requires_grad=True),
                    loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                    loss_bbox=dict(type='GIoULoss', loss_weight=10.0))

    def rcnn(iou):
        return dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=iou, neg_iou_thr=iou, min_pos_iou=iou,
                                  match_low_quality=False, ignore_iof_thr=-1),
                    sampler=dict(type='RandomSampler', num=100000, pos_fraction=0.25, neg_pos_ub=-1,
                                 add_gt_as_proposals=True),
                    mask_size=28, pos_weight=-1, debug=False)
    return dict(
        type='CascadeRCNN',
        data_preprocessor=dict(type='DetDataPreprocessor', mean=MEAN, std=STD, bgr_to_rgb=True,
                               pad_size_divisor=32, pad_mask=True),
        backbone=dict(BACKBONE, out_indices=(0, 1, 2, 3)),
        neck=dict(type='FPN', in_channels=[8, 16, 32, 64], out_channels=16, num_outs=5),
        rpn_head=dict(
            type='RPNHead', in_channels=16, feat_channels=16,
            anchor_generator=dict(type='AnchorGenerator', scales=[8], ratios=[0.5, 1.0, 2.0],
                                  strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0], target_stds=[1.0, 1.0, 1.0, 1.0]),
            loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type='SmoothL1Loss', beta=1.0 / 9.0, loss_weight=1.0)),
        roi_head=dict(
            type='CascadeRoIHead', num_stages=3, stage_loss_weights=[1, 0.5, 0.25],
            bbox_roi_extractor=dict(type='SingleRoIExtractor', roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
                                    out_channels=16, featmap_strides=[4, 8, 16, 32]),
            bbox_head=[box_head([0.1, 0.1, 0.2, 0.2]), box_head([0.05, 0.05, 0.1, 0.1]),
                       box_head([0.033, 0.033, 0.067, 0.067])],
            mask_roi_extractor=dict(type='SingleRoIExtractor', roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=0),
                                    out_channels=16, featmap_strides=[4, 8, 16, 32]),
            mask_head=dict(type='FCNMaskHead', num_convs=4, in_channels=16, conv_out_channels=16,
                           num_classes=num_classes,
                           loss_mask=dict(type='CrossEntropyLoss', use_mask=True, loss_weight=1.0))),
        train_cfg=dict(
            rpn=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                                   match_low_quality=True, ignore_iof_thr=-1),
                     sampler=dict(type='RandomSampler', num=1000000, pos_fraction=0.5, neg_pos_ub=-1,
                                  add_gt_as_proposals=False),
                     allowed_border=0, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=2000, max_per_img=2000, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
            rcnn=[rcnn(0.5), rcnn(0.6), rcnn(0.7)]),
        test_cfg=dict(
            rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=100,
                      mask_thr_binary=0.5)))


# The Sparse R-CNN fixture's narrowed head: 16 channels (8 heads of 2), FFN 64, dynamic conv 8.
SPARSE_WIDTHS = dict(channels=16, ffn=64, dynamic=8, proposals=300)


def sparse_rcnn_config(num_classes=80):
    """The official Sparse R-CNN config (300 proposals, six DIIHead stages, Hungarian matching) at the
    widths SPARSE_WIDTHS; test: the best 300 (proposal, class) scores."""
    w = SPARSE_WIDTHS
    stage = dict(
        type='DIIHead', num_classes=num_classes, num_ffn_fcs=2, num_heads=8, num_cls_fcs=1, num_reg_fcs=3,
        feedforward_channels=w['ffn'], in_channels=w['channels'], dropout=0.0,
        ffn_act_cfg=dict(type='ReLU', inplace=True),
        dynamic_conv_cfg=dict(type='DynamicConv', in_channels=w['channels'], feat_channels=w['dynamic'],
                              out_channels=w['channels'], input_feat_shape=7,
                              act_cfg=dict(type='ReLU', inplace=True), norm_cfg=dict(type='LN')),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', clip_border=False, target_means=[0., 0., 0., 0.],
                        target_stds=[0.5, 0.5, 1., 1.]))
    assigner = dict(type='HungarianAssigner', match_costs=[
        dict(type='FocalLossCost', weight=2.0), dict(type='BBoxL1Cost', weight=5.0, box_format='xyxy'),
        dict(type='IoUCost', iou_mode='giou', weight=2.0)])
    return dict(
        type='SparseRCNN',
        data_preprocessor=dict(type='DetDataPreprocessor', mean=MEAN, std=STD, bgr_to_rgb=True,
                               pad_size_divisor=32),
        backbone=dict(BACKBONE, out_indices=(0, 1, 2, 3)),
        neck=dict(type='FPN', in_channels=[8, 16, 32, 64], out_channels=w['channels'], start_level=0,
                  add_extra_convs='on_input', num_outs=4),
        rpn_head=dict(type='EmbeddingRPNHead', num_proposals=w['proposals'],
                      proposal_feature_channel=w['channels']),
        roi_head=dict(
            type='SparseRoIHead', num_stages=6, stage_loss_weights=[1] * 6,
            proposal_feature_channel=w['channels'],
            bbox_roi_extractor=dict(type='SingleRoIExtractor',
                                    roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=2),
                                    out_channels=w['channels'], featmap_strides=[4, 8, 16, 32]),
            bbox_head=[copy.deepcopy(stage) for _ in range(6)]),
        train_cfg=dict(rpn=None, rcnn=[dict(assigner=copy.deepcopy(assigner), sampler=dict(type='PseudoSampler'),
                                            pos_weight=1) for _ in range(6)]),
        test_cfg=dict(rpn=None, rcnn=dict(max_per_img=w['proposals'])))


def gt_masks(boxes, shape):
    """An ellipse inscribed in each box: (N, H, W) uint8."""
    H, W = shape
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    masks = []
    for x1, y1, x2, y2 in boxes:
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        masks.append((((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).astype(np.uint8))
    return np.stack(masks)


def perturb(model, generator):
    """Every tensor off its initial value; classifier biases spread so that many boxes pass 0.05."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
            if name.endswith('atss_cls.bias'):
                p.copy_(torch.empty(p.shape).uniform_(-4.0, -1.5, generator=generator))
            if name.endswith('fc_cls.weight'):
                p.mul_(3.0)  # spread the class scores, so that detections pass 0.05
            if name.endswith('init_proposal_bboxes.weight'):
                # Proposals spread over the image (centres 0.2-0.8, sides 0.1-0.6 of it) rather than
                # all covering the whole image, as the initial ones do.
                p[:, :2].uniform_(0.2, 0.8, generator=generator)
                p[:, 2:].uniform_(0.1, 0.6, generator=generator)
        for name, b in model.named_buffers():
            # Running statistics of norms; the preprocessor's mean and std stay the official ones.
            if b.dtype.is_floating_point and not name.startswith('data_preprocessor.'):
                b.add_(torch.rand(b.shape, generator=generator) * 0.1)


def pipeline():
    from mmcv.transforms import Compose
    return Compose([dict(type='LoadImageFromNDArray'),
                    dict(type='Resize', scale=TEST_SCALE, keep_ratio=True),
                    dict(type='PackDetInputs',
                         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))])


def run_method(name, config):
    mmengine.logging.MMLogger.get_current_instance().setLevel('WARNING')
    register_all_modules()
    register_focalnet()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MODELS.build(ConfigDict(copy.deepcopy(config)))
    model.init_weights()
    perturb(model, generator)
    # Saved before the training step, whose batch norms update their running statistics.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    test = pipeline()
    images, metas, detections = [], [], []
    for i, rgb in enumerate(photos()):
        data = test(dict(img=np.ascontiguousarray(rgb[..., ::-1]), img_id=i))  # mmdetection reads BGR
        batch = dict(inputs=[data['inputs']], data_samples=[data['data_samples']])
        with torch.no_grad():
            result = model.test_step(batch)[0]
        resized = data['inputs'].flip(0).permute(1, 2, 0).contiguous()  # BGR CHW -> RGB HWC, uint8
        meta = result.metainfo
        images.append(resized)
        metas.append({k: tuple(float(v) for v in meta[k]) if k == 'scale_factor' else tuple(meta[k])
                      for k in ('ori_shape', 'img_shape', 'pad_shape', 'batch_input_shape', 'scale_factor')})
        pred = result.pred_instances
        det = {'boxes': pred.bboxes.clone(), 'scores': pred.scores.clone(), 'labels': pred.labels.clone()}
        if 'masks' in pred:
            # (N, H, W) of the original image as COCO run-length encodings (pycocotools decodes them)
            from pycocotools import mask as mask_util
            det['masks'] = mask_util.encode(np.asfortranarray(pred.masks.numpy().transpose(1, 2, 0).astype(np.uint8)))
        detections.append(det)
        print(f'{name}: image {i} {tuple(rgb.shape)} -> {meta["img_shape"]}: {len(det["boxes"])} detections')

    # One training step on both images as one batch (mmdetection's batch padding and anchor flags).
    model.train()
    samples = []
    for i, image in enumerate(images):
        sample = DetDataSample(metainfo={'img_shape': tuple(image.shape[:2]), 'ori_shape': tuple(image.shape[:2]),
                                         'scale_factor': (1.0, 1.0)})
        sample.gt_instances = InstanceData(bboxes=torch.tensor(GT_BOXES[i]), labels=torch.tensor(GT_LABELS[i]))
        if 'mask' in name:
            from mmdet.structures.mask import BitmapMasks
            sample.gt_instances.masks = BitmapMasks(gt_masks(GT_BOXES[i], image.shape[:2]), *image.shape[:2])
        samples.append(sample)
    data = model.data_preprocessor(dict(inputs=[im.permute(2, 0, 1).flip(0).contiguous() for im in images],
                                        data_samples=samples), True)
    torch.manual_seed(0)
    if name == 'sparse_rcnn':
        record_matches(model, name)
    losses = model.loss(data['inputs'], data['data_samples'])
    losses = {k: float(sum(v) if isinstance(v, (list, tuple)) else v) for k, v in losses.items()}
    print(f'{name}: losses {losses}')
    assignment = ASSIGNMENTS[name](model, data) if name in ASSIGNMENTS else None
    if name in RECORDED_ASSIGNMENTS:
        assignment = torch.stack([torch.stack(stage) for stage in RECORDED_ASSIGNMENTS[name]]).to(torch.int16)
    train_metas = [{k: tuple(s.metainfo[k]) for k in ('img_shape', 'pad_shape', 'batch_input_shape')}
                   for s in data['data_samples']]
    fixture = {
        'versions': {'mmdet': mmdet.__version__, 'mmcv': mmcv.__version__, 'mmengine': mmengine.__version__,
                     'torch': torch.__version__},
        'config': config,
        'checkpoint': {'meta': {'mmdet_version': mmdet.__version__, 'epoch': 36}, 'state_dict': state},
        'images': images, 'metas': metas, 'detections': detections,
        'train': {'boxes': [torch.tensor(b) for b in GT_BOXES], 'labels': [torch.tensor(lb) for lb in GT_LABELS],
                  'metas': train_metas, 'losses': losses,
                  'assignment': assignment,
                  'masks': [torch.from_numpy(np.packbits(gt_masks(b, im.shape[:2]), axis=-1))
                            for b, im in zip(GT_BOXES, images)]},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, OUT / f'{name}.pt')
    print(f'wrote {OUT / f"{name}.pt"} ({os.path.getsize(OUT / f"{name}.pt") / 1e6:.2f} MB)')


def atss_assignment(model, data):
    """The class mmdetection's ATSS assigns to every anchor of the batch (num_classes: background;
    anchors on padding count as background), (B, anchors) int16."""
    head = model.bbox_head
    samples = data['data_samples']
    with torch.no_grad():
        outs = head(model.extract_feat(data['inputs']))
    sizes = [c.shape[-2:] for c in outs[0]]
    metas = [s.metainfo for s in samples]
    anchors, flags = head.get_anchors(sizes, metas, device='cpu')
    targets = head.get_targets(anchors, flags, [s.gt_instances for s in samples], metas)
    return torch.cat(targets[1], dim=1).to(torch.int16)


RECORDED_ASSIGNMENTS = {}


def record_matches(model, name):
    """Keep, per stage and image, the box (1-based; 0 for none) that the Hungarian assigner gives each
    proposal: (stages, images, proposals) int16 in RECORDED_ASSIGNMENTS[name]."""
    stages = []
    for assigner in model.roi_head.bbox_assigner:
        stages.append([])

        def assign(*args, _inner=assigner.assign, _out=stages[-1], **kwargs):
            result = _inner(*args, **kwargs)
            _out.append(result.gt_inds.clone())
            return result
        assigner.assign = assign
    RECORDED_ASSIGNMENTS[name] = stages


METHODS = {'atss': atss_config, 'cascade_mask_rcnn': cascade_mask_rcnn_config, 'sparse_rcnn': sparse_rcnn_config}
ASSIGNMENTS = {'atss': atss_assignment}
# The thread count each fixture is made with (and its tests compare at): the order of a few float
# sums in mmdetection's and our kernels depends on it. ATSS and Cascade were made on 2 threads
# (tests/conftest.py FIXTURE_THREADS); Sparse R-CNN, whose six box refinements amplify rounding in
# random-weight models, on 1.
THREADS = {'atss': 2, 'cascade_mask_rcnn': 2, 'sparse_rcnn': 1}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('methods', nargs='+', choices=sorted(METHODS))
    args = parser.parse_args(argv)
    for name in args.methods:
        torch.set_num_threads(THREADS[name])
        run_method(name, METHODS[name]())


if __name__ == '__main__':
    main()
