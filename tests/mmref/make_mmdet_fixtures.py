"""Make tests/fixtures/mmdet/: mmdetection's own detections and training losses for the official
FocalNet Mask R-CNN and Faster R-CNN configs, at small widths with random weights.

    .venv-mmref/bin/python tests/mmref/make_mmdet_fixtures.py [--out tests/fixtures/mmdet]

(the environment of requirements-mmref.txt; any python with those packages works).

Each model is the official config (mask_rcnn_focalnet_{tiny,small,base}_..._{srf,lrf}.py and its
Faster R-CNN counterpart) written in mmdetection 3's form, with the backbone shrunk in width and depth
and the neck and heads in width, their structure kept. Every tensor is drawn at random (so a wrong key,
a wrong reordering or a transposed weight changes the result), saved as a released checkpoint
({'meta': {'CLASSES', versions}, 'state_dict'}), and run through mmdetection's own test pipeline
(LoadImageFromFile, Resize 1333x800 keep-ratio, the data preprocessor) on two photographs from
scikit-learn: china.jpg at 640x427 (resized to 1199x800) and flower.jpg enlarged twice by repetition
and cropped to 1280x800 (kept at its size). For Mask R-CNN T-SRF, one training step is recorded too:
the RPN anchors and RoIs that mmdetection's samplers drew, and the losses it computed for them.

Needs mmdet 3.3.0, mmcv-lite 2.1.0, mmengine 0.10.7 (requirements-mmref.txt) and the kernel
shim tests/mmref/shim.py. The tests (tests/test_detection_mmdet.py) read only the files written here.
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))

from mmref import shim  # noqa: E402

shim.install()

import cv2  # noqa: E402
import mmcv  # noqa: E402
import mmdet  # noqa: E402
import mmengine  # noqa: E402
from mmdet.apis import inference_detector  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

from mmref.backbone import register_focalnet  # noqa: E402

COCO_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog',
    'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed',
    'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone',
    'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush')

# The official backbones (embed_dim, depths, focal levels, focal windows), shrunk: widths / 12,
# depths cut, the SRF / LRF focal levels and the windows kept.
VARIANTS = {
    'mask_rcnn_tiny_srf': dict(method='mask_rcnn', embed_dim=8, depths=[1, 1, 2, 1], levels=2),
    'mask_rcnn_tiny_lrf': dict(method='mask_rcnn', embed_dim=8, depths=[1, 1, 2, 1], levels=3),
    'mask_rcnn_small_srf': dict(method='mask_rcnn', embed_dim=8, depths=[1, 1, 3, 1], levels=2),
    'mask_rcnn_base_lrf': dict(method='mask_rcnn', embed_dim=12, depths=[1, 1, 3, 1], levels=3),
    'faster_rcnn_tiny_srf': dict(method='faster_rcnn', embed_dim=8, depths=[1, 1, 2, 1], levels=2),
}
NECK, FC, MASK_CONV = 16, 32, 16  # official: 256, 1024, 256


def model_config(method: str, embed_dim: int, depths, levels: int) -> dict:
    """The official config's model, in mmdetection 3's form (values of the official FocalNet
    configs, which are mmdetection's mask_rcnn_r50_fpn with the FocalNet backbone)."""
    dims = [embed_dim * 2 ** i for i in range(4)]
    roi_head = dict(
        type='StandardRoIHead',
        bbox_roi_extractor=dict(type='SingleRoIExtractor',
                                roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
                                out_channels=NECK, featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(type='Shared2FCBBoxHead', in_channels=NECK, fc_out_channels=FC, roi_feat_size=7,
                       num_classes=80,
                       bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                                       target_stds=[0.1, 0.1, 0.2, 0.2]),
                       reg_class_agnostic=False,
                       loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                       loss_bbox=dict(type='L1Loss', loss_weight=1.0)))
    rcnn_train = dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5,
                                    min_pos_iou=0.5, match_low_quality=True, ignore_iof_thr=-1),
                      sampler=dict(type='RandomSampler', num=512, pos_fraction=0.25, neg_pos_ub=-1,
                                   add_gt_as_proposals=True),
                      pos_weight=-1, debug=False)
    rcnn_test = dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)
    if method == 'mask_rcnn':
        roi_head.update(
            mask_roi_extractor=dict(type='SingleRoIExtractor',
                                    roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=0),
                                    out_channels=NECK, featmap_strides=[4, 8, 16, 32]),
            mask_head=dict(type='FCNMaskHead', num_convs=4, in_channels=NECK, conv_out_channels=MASK_CONV,
                           num_classes=80,
                           loss_mask=dict(type='CrossEntropyLoss', use_mask=True, loss_weight=1.0)))
        rcnn_train['mask_size'] = 28
        rcnn_test['mask_thr_binary'] = 0.5
    return dict(
        type='MaskRCNN' if method == 'mask_rcnn' else 'FasterRCNN',
        data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32,
                               pad_mask=True),
        backbone=dict(type='FocalNet', embed_dim=embed_dim, depths=depths, mlp_ratio=4.,
                      drop_path_rate=0.0, patch_norm=True, out_indices=(0, 1, 2, 3),
                      focal_levels=[levels] * 4, focal_windows=[9] * 4, use_checkpoint=False),
        neck=dict(type='FPN', in_channels=dims, out_channels=NECK, num_outs=5),
        rpn_head=dict(type='RPNHead', in_channels=NECK, feat_channels=NECK,
                      anchor_generator=dict(type='AnchorGenerator', scales=[8], ratios=[0.5, 1.0, 2.0],
                                            strides=[4, 8, 16, 32, 64]),
                      bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                                      target_stds=[1.0, 1.0, 1.0, 1.0]),
                      loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
                      loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        roi_head=roi_head,
        train_cfg=dict(
            rpn=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.7, neg_iou_thr=0.3,
                                   min_pos_iou=0.3, match_low_quality=True, ignore_iof_thr=-1),
                     sampler=dict(type='RandomSampler', num=256, pos_fraction=0.5, neg_pos_ub=-1,
                                  add_gt_as_proposals=False),
                     allowed_border=-1, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=2000, max_per_img=1000, nms=dict(type='nms', iou_threshold=0.7),
                              min_bbox_size=0),
            rcnn=rcnn_train),
        test_cfg=dict(
            rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type='nms', iou_threshold=0.7),
                     min_bbox_size=0),
            rcnn=rcnn_test))


TEST_PIPELINE = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]


def randomize(model: torch.nn.Module, generator: torch.Generator):
    """Every tensor random: weights and biases ~ N(0, s^2) with s = 1/sqrt(fan-in) (so activations
    keep their scale through the random network), norm weights ~ 1 + N(0, 0.1^2); the classifiers a
    little sharper, so that detections pass the 0.05 score threshold. Values are rounded to float16
    and saved so (the files stay small); the model runs in float32 on exactly those values."""
    for name, p in model.state_dict().items():
        if not p.is_floating_point():
            continue
        if p.ndim == 1 and 'norm' in name and name.endswith('weight'):
            value = 1 + 0.1 * torch.randn(p.shape, generator=generator)
        elif p.ndim == 1:
            value = 0.1 * torch.randn(p.shape, generator=generator)
        else:
            fan_in = p[0].numel() if 'upsample' not in name else p.shape[0] * p[0, 0].numel()
            value = torch.randn(p.shape, generator=generator) / fan_in ** 0.5
            if name.endswith(('fc_cls.weight', 'rpn_cls.weight')):
                value *= 4.0
        p.copy_(value.half().float())


def photographs():
    """(name, RGB uint8 array): china.jpg as it is (640x427: resized) and flower.jpg enlarged twice
    by repetition and cropped to 1280x800 (already at the test scale: kept)."""
    from sklearn.datasets import load_sample_images
    china, flower = load_sample_images().images
    big = np.repeat(np.repeat(flower, 2, axis=0), 2, axis=1)[:800, :1280]
    return [('china', np.ascontiguousarray(china)), ('flower2x', np.ascontiguousarray(big))]


def encode_masks(masks: np.ndarray) -> list:
    rles = mask_util.encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0)))
    return [dict(size=r['size'], counts=r['counts'].decode('ascii')) for r in rles]


def run_inference(model, photos, out: Path, name: str) -> dict:
    records = {}
    for photo, rgb in photos:
        path = out / f'_{photo}.png'
        cv2.imwrite(str(path), rgb[:, :, ::-1])  # lossless: the decoded pixels are rgb exactly
        result = inference_detector(model, str(path))
        path.unlink()
        inst = result.pred_instances
        rec = dict(img_shape=list(result.img_shape), ori_shape=list(result.ori_shape),
                   scale_factor=list(result.scale_factor), boxes=inst.bboxes.tolist(),
                   scores=inst.scores.tolist(), labels=inst.labels.tolist())
        if 'masks' in inst:
            rec['masks'] = encode_masks(inst.masks.numpy())
        records[photo] = rec
        print(f'{name} {photo}: {len(rec["scores"])} detections, '
              f'scores {min(rec["scores"], default=0):.3f}..{max(rec["scores"], default=0):.3f}')
    return records


def training_step(model, rgb: np.ndarray, generator: torch.Generator) -> dict:
    """One training step's losses on a photograph with three made-up objects, and what the samplers
    drew for them: the RPN's sampled anchors (positive with their ground-truth box, negative) and
    the RoI head's sampled RoIs (with labels, ground-truth boxes and, for positives, mask targets)."""
    model.train()
    H, W = rgb.shape[:2]
    boxes = torch.tensor([[40., 30., 300., 260.], [200., 120., 520., 400.], [380., 20., 630., 200.]])
    labels = torch.tensor([0, 17, 56])
    masks = np.zeros((3, H, W), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        cv2.ellipse(masks[i], ((x1 + x2) // 2, (y1 + y2) // 2), ((x2 - x1) // 2, (y2 - y1) // 2), 0, 0, 360, 1, -1)
    sample = DetDataSample(metainfo=dict(img_shape=(H, W), ori_shape=(H, W), pad_shape=(H, W),
                                         batch_input_shape=(H, W), scale_factor=(1., 1.)))
    sample.gt_instances = InstanceData(bboxes=boxes, labels=labels, masks=BitmapMasks(masks, H, W))
    data = model.data_preprocessor(dict(inputs=[torch.from_numpy(rgb[:, :, ::-1].copy()).permute(2, 0, 1)],
                                        data_samples=[sample]), training=True)
    inputs, samples = data['inputs'], data['data_samples']

    drawn = {}

    def recording(sampler, key):
        original = sampler.sample

        def sample_and_record(assign_result, pred_instances, gt_instances, **kwargs):
            result = original(assign_result, pred_instances, gt_instances, **kwargs)
            # Copies: mmdetection's mask targets clip the positive priors in place afterwards.
            drawn[key] = dict(pos_inds=result.pos_inds.clone(), neg_inds=result.neg_inds.clone(),
                              pos_priors=result.pos_priors.clone(), neg_priors=result.neg_priors.clone(),
                              pos_assigned_gt_inds=result.pos_assigned_gt_inds.clone())
            return result
        sampler.sample = sample_and_record

    recording(model.rpn_head.sampler, 'rpn')
    recording(model.roi_head.bbox_sampler, 'rcnn')
    torch.manual_seed(0)
    # model.loss's steps, with 60 jittered copies of the ground truth added to the RPN's proposals:
    # a random RPN proposes few boxes near the objects, and the box and mask losses need positives.
    with torch.no_grad():
        feats = model.extract_feat(inputs)
        rpn_samples = copy.deepcopy(samples)
        for s in rpn_samples:  # the RPN sees one class
            s.gt_instances.labels = torch.zeros_like(s.gt_instances.labels)
        rpn_losses, proposals = model.rpn_head.loss_and_predict(
            feats, rpn_samples, proposal_cfg=model.train_cfg.rpn_proposal)
        losses = {f'loss_rpn_{k[5:]}' if not k.startswith('loss_rpn') else k: v for k, v in rpn_losses.items()}
        jitter = boxes.repeat(20, 1) + 25 * torch.randn(60, 4, generator=generator)
        jitter = torch.cat([jitter[:, :2].clamp(min=0), jitter[:, 2:]], 1)
        proposals = [InstanceData(bboxes=torch.cat([proposals[0].bboxes, jitter]),
                                  scores=torch.cat([proposals[0].scores, torch.ones(60)]))]
        losses.update(model.roi_head.loss(feats, proposals, samples))
    losses = {k: float(sum(v) if isinstance(v, (list, tuple)) else v) for k, v in losses.items()
              if 'acc' not in k}
    rpn, rcnn = drawn['rpn'], drawn['rcnn']
    record = dict(
        input=inputs[0].shape[-2:], gt_boxes=boxes.tolist(), gt_labels=labels.tolist(),
        gt_masks=encode_masks(masks), losses=losses,
        rpn_pos=rpn['pos_inds'].tolist(), rpn_neg=rpn['neg_inds'].tolist(),
        rpn_pos_gt=rpn['pos_assigned_gt_inds'].tolist(),
        rcnn_rois=torch.cat([rcnn['pos_priors'], rcnn['neg_priors']]).tolist(),
        rcnn_num_pos=int(rcnn['pos_priors'].shape[0]),
        rcnn_pos_gt=rcnn['pos_assigned_gt_inds'].tolist())
    record['input'] = list(record['input'])
    outside = sum(1 for x1, y1, x2, y2 in record['rcnn_rois'][:record['rcnn_num_pos']] if x2 > W or y2 > H)
    print(f'{outside} positive RoIs reach beyond the image')
    print(f'training step: {losses}; {len(record["rpn_pos"])}+{len(record["rpn_neg"])} anchors, '
          f'{record["rcnn_num_pos"]}+{len(record["rcnn_rois"]) - record["rcnn_num_pos"]} RoIs')
    return record


def resize_checksums(photos) -> list:
    """SHA-256 of OpenCV's INTER_LINEAR resize (mmcv.imresize's) of each photograph to a few sizes,
    up and down: the test-time resize must equal it bit for bit."""
    import hashlib
    cases = []
    for photo, rgb in photos:
        h, w = rgb.shape[:2]
        for size in ((800, 1199), (222, 333), (h * 3 // 5, w * 3 // 5), (h + 7, w + 13)):
            out = mmcv.imresize(rgb, (size[1], size[0]), interpolation='bilinear', backend='cv2')
            cases.append(dict(photo=photo, size=list(size), sha256=hashlib.sha256(out.tobytes()).hexdigest()))
    return cases


def undecayed_parameters(model) -> list:
    """Names of the parameters the official optimizer config leaves without weight decay (AdamW,
    weight decay 0.05, paramwise_cfg custom_keys absolute_pos_embed / relative_position_bias_table /
    norm with decay_mult 0), as mmengine's optimizer constructor groups them."""
    from mmengine.optim import build_optim_wrapper
    wrapper = build_optim_wrapper(model, dict(
        optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
        paramwise_cfg=dict(custom_keys={'absolute_pos_embed': dict(decay_mult=0.),
                                        'relative_position_bias_table': dict(decay_mult=0.),
                                        'norm': dict(decay_mult=0.)})))
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted(names[id(p)] for group in wrapper.optimizer.param_groups if group['weight_decay'] == 0
                  for p in group['params'])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default=str(REPO / 'tests' / 'fixtures' / 'mmdet'))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)  # the count the tests compare on (tests/conftest.py FIXTURE_THREADS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    register_all_modules()
    register_focalnet()
    versions = dict(mmdet=mmdet.__version__, mmcv=mmcv.__version__, mmengine=mmengine.__version__,
                    torch=torch.__version__, opencv=cv2.__version__)
    photos = photographs()
    index = dict(versions=versions, classes=list(COCO_CLASSES), resize=resize_checksums(photos), models={})
    for i, (name, v) in enumerate(VARIANTS.items()):
        generator = torch.Generator().manual_seed(1000 + i)
        model_cfg = model_config(v['method'], v['embed_dim'], v['depths'], v['levels'])
        cfg = Config(dict(model=model_cfg, test_dataloader=dict(dataset=dict(pipeline=TEST_PIPELINE))))
        model = MODELS.build(cfg.model)
        with torch.no_grad():
            randomize(model, generator)
        model.cfg = cfg
        model.dataset_meta = dict(classes=COCO_CLASSES)
        model.eval()
        state = {k: v.half() if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
        torch.save(dict(meta=dict(CLASSES=COCO_CLASSES, mmdet_version=mmdet.__version__),
                        state_dict=state), out / f'{name}.pth')
        entry = dict(method=v['method'], embed_dim=v['embed_dim'], depths=v['depths'],
                     focal_levels=[v['levels']] * 4, focal_windows=[9] * 4, fpn_channels=NECK,
                     box_head_dim=FC, mask_head_dim=MASK_CONV, checkpoint=f'{name}.pth',
                     detections=run_inference(model, photos, out, name))
        if name == 'mask_rcnn_tiny_srf':
            entry['training'] = training_step(model, photos[0][1], generator)
            entry['undecayed'] = undecayed_parameters(model)
        index['models'][name] = entry
    with open(out / 'reference.json', 'w') as f:
        json.dump(index, f, separators=(',', ':'))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
