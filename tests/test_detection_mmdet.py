"""The two-stage detectors against mmdetection itself: released checkpoints (random weights, official
configs at small widths) load strictly and give mmdetection's detections on real photographs, and one
training step gives its losses for the same sampled anchors and RoIs.

The references are tests/fixtures/mmdet/, made by mmdetection 3.3 with
``.venv-mmref/bin/python tests/mmref/make_mmdet_fixtures.py`` (see its docstring); nothing from
mmdetection is imported here. CPU only.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from conftest import ROOT

from config import load_config
from detection.checkpoint import (KEY_MAP, check_classes, load_released_detector, released_classes)
from detection.mmdet_heads import (MMBoxCoder, mask_head_loss, mask_targets, box_head_loss,
                                   paste_masks, rescale_size, resize_uint8_bilinear, rpn_sampled_loss)
from detection.model import build_detector
from models.pretrained import CheckpointError

pytestmark = [pytest.mark.filterwarnings('ignore::DeprecationWarning'), pytest.mark.usefixtures('fixture_threads')]

FIXTURES = Path(__file__).parent / 'fixtures' / 'mmdet'
REFERENCE = json.loads((FIXTURES / 'reference.json').read_text())
MODELS = REFERENCE['models']
CLASSES = REFERENCE['classes']


def build(entry: dict) -> torch.nn.Module:
    cfg = str(ROOT / 'configs' / 'detection' / f'{entry["method"]}_focalnet_tiny_srf_1x.yaml')
    opts = ['MODEL.FOCAL.EMBED_DIM', str(entry['embed_dim']), 'MODEL.FOCAL.DEPTHS', str(entry['depths']),
            'MODEL.FOCAL.FOCAL_LEVELS', str(entry['focal_levels']),
            'MODEL.FOCAL.FOCAL_WINDOWS', str(entry['focal_windows']), 'MODEL.DROP_PATH_RATE', '0.0',
            'DETECTION.FPN_CHANNELS', str(entry['fpn_channels']),
            'DETECTION.BOX_HEAD_DIM', str(entry['box_head_dim']),
            'DETECTION.MASK_HEAD_DIM', str(entry['mask_head_dim'])]
    config = load_config(cfg, opts)
    return build_detector(config, len(CLASSES)).eval()


def photographs():
    """The generator's two photographs: china.jpg (640x427, resized to the test scale) and
    flower.jpg repeated twice in each direction and cropped to 1280x800 (kept at its size)."""
    from sklearn.datasets import load_sample_images
    china, flower = load_sample_images().images
    big = np.repeat(np.repeat(flower, 2, axis=0), 2, axis=1)[:800, :1280]
    return {'china': china, 'flower2x': np.ascontiguousarray(big)}


def as_input(rgb: np.ndarray) -> torch.Tensor:
    """What the data loader gives the detector: float pixels / 255."""
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255


def decode(rles: list) -> np.ndarray:
    return mask_util.decode([dict(size=r['size'], counts=r['counts'].encode('ascii')) for r in rles]
                            ).transpose(2, 0, 1).astype(bool)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


@pytest.fixture(scope='module')
def photos():
    return photographs()


@pytest.mark.parametrize('name', list(MODELS))
def test_released_checkpoint_gives_mmdetections_detections(name, photos):
    entry = MODELS[name]
    model = build(entry)
    report = load_released_detector(model, str(FIXTURES / entry['checkpoint']), CLASSES)
    assert report['loaded'] == len(model.state_dict())
    assert len(report['reordered']) == (6 if entry['method'] == 'mask_rcnn' else 4)
    for photo, ref in entry['detections'].items():
        image = as_input(photos[photo])
        assert list(image.shape[-2:]) == ref['ori_shape']
        assert rescale_size(*ref['ori_shape']) == tuple(ref['img_shape'])
        with torch.inference_mode():
            out = model([image])[0]
        n = len(ref['scores'])
        assert n > 50, f'{name} {photo}: the reference has too few detections to compare'
        assert len(out['scores']) == n, f'{name} {photo}: {len(out["scores"])} detections vs {n}'
        labels = out['labels'] - 1  # mmdetection's labels are 0-based, without background
        same = (labels.numpy() == np.array(ref['labels']))
        box_err = np.abs(out['boxes'].numpy() - np.array(ref['boxes'])).max(axis=1)
        score_err = np.abs(out['scores'].numpy() - np.array(ref['scores']))
        good = same & (box_err <= 1e-3) & (score_err <= 1e-5)
        if 'masks' in ref:
            ours = out['masks'][:, 0].numpy() > 0.5
            theirs = decode(ref['masks'])
            good &= np.array([mask_iou(a, b) >= 0.999 for a, b in zip(ours, theirs)])
        assert good.mean() >= 0.99, (
            f'{name} {photo}: {good.sum()}/{n} detections agree; label mismatches {(~same).sum()}, '
            f'box error max {box_err.max():.2e}, score error max {score_err.max():.2e}')


def test_resize_is_opencvs_bit_for_bit(photos):
    """The test-time resize against OpenCV's cv2.resize(INTER_LINEAR) (checksums of its output)."""
    import hashlib
    for case in REFERENCE['resize']:
        image = torch.from_numpy(np.array(photos[case['photo']])).permute(2, 0, 1).contiguous()
        out = resize_uint8_bilinear(image, tuple(case['size'])).permute(1, 2, 0).contiguous().numpy()
        assert hashlib.sha256(out.tobytes()).hexdigest() == case['sha256'], case['size']


def test_training_step_gives_mmdetections_losses(photos):
    """For the anchors and RoIs mmdetection's samplers drew, our losses equal mmdetection's."""
    entry = MODELS['mask_rcnn_tiny_srf']
    ref = entry['training']
    model = build(entry)
    load_released_detector(model, str(FIXTURES / entry['checkpoint']))
    model.train()
    rgb = photos['china']
    mean = torch.tensor([123.675, 116.28, 103.53])[:, None, None]
    std = torch.tensor([58.395, 57.12, 57.375])[:, None, None]
    pixels = (torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() - mean) / std
    H, W = ref['input']
    batch = torch.nn.functional.pad(pixels, (0, W - pixels.shape[2], 0, H - pixels.shape[1]))[None]
    features = model.backbone(batch)
    maps = list(features.values())
    gt_boxes = torch.tensor(ref['gt_boxes'])
    gt_labels = torch.tensor(ref['gt_labels']) + 1
    gt_masks = torch.from_numpy(decode(ref['gt_masks']))

    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import concat_box_prediction_layers
    images = ImageList(batch, [tuple(rgb.shape[:2])])
    objectness, deltas = model.rpn.head(maps)
    anchors = model.rpn.anchor_generator(images, maps)[0]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    pos, neg = torch.tensor(ref['rpn_pos']), torch.tensor(ref['rpn_neg'])
    targets = torch.zeros_like(anchors)
    targets[pos] = model.rpn.box_coder.encode_single(gt_boxes[torch.tensor(ref['rpn_pos_gt'])], anchors[pos])
    rpn_cls, rpn_box = rpn_sampled_loss(objectness.flatten(), deltas, targets, pos, neg)

    rois = torch.tensor(ref['rcnn_rois'])
    num_pos = ref['rcnn_num_pos']
    matched = torch.tensor(ref['rcnn_pos_gt'])
    labels = torch.zeros(len(rois), dtype=torch.long)
    labels[:num_pos] = gt_labels[matched]
    box_targets = torch.zeros_like(rois)
    box_targets[:num_pos] = model.roi_heads.box_coder.encode_single(gt_boxes[matched], rois[:num_pos])
    heads = model.roi_heads
    class_logits, box_regression = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, [rois])))
    cls, box = box_head_loss(class_logits, box_regression, labels, box_targets)
    mask_logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, [rois[:num_pos]])))
    mask = mask_head_loss(mask_logits, labels[:num_pos], mask_targets(gt_masks[matched], rois[:num_pos], 28, (H, W)))

    ours = dict(loss_rpn_cls=rpn_cls, loss_rpn_bbox=rpn_box, loss_cls=cls, loss_bbox=box, loss_mask=mask)
    for key, value in ref['losses'].items():
        assert ours[key].item() == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_key_map_covers_every_released_tensor_once():
    """Every key of the released files matches exactly one row of the table."""
    import re
    for entry in MODELS.values():
        state = torch.load(FIXTURES / entry['checkpoint'], weights_only=True)['state_dict']
        for key in state:
            rows = [theirs for theirs, _, _ in KEY_MAP if re.fullmatch(theirs, key)]
            assert len(rows) == 1, (key, rows)


def test_a_checkpoint_that_does_not_fit_is_one_error_listing_the_keys(tmp_path):
    entry = MODELS['mask_rcnn_tiny_srf']
    checkpoint = torch.load(FIXTURES / entry['checkpoint'], weights_only=True)
    state = dict(checkpoint['state_dict'])
    state['roi_head.extra_head.weight'] = torch.zeros(1)
    torch.save({'meta': checkpoint['meta'], 'state_dict': state}, tmp_path / 'extra.pth')
    with pytest.raises(CheckpointError, match='roi_head.extra_head.weight'):
        load_released_detector(build(entry), str(tmp_path / 'extra.pth'))

    state = dict(checkpoint['state_dict'])
    del state['roi_head.mask_head.convs.2.conv.weight']
    state['rpn_head.rpn_cls.weight'] = state['rpn_head.rpn_cls.weight'][:2]
    torch.save({'state_dict': state}, tmp_path / 'broken.pth')
    with pytest.raises(CheckpointError) as e:
        load_released_detector(build(entry), str(tmp_path / 'broken.pth'))
    message = str(e.value)
    assert 'roi_heads.mask_head.2.0.weight' in message and 'rpn.head.cls_logits.weight' in message
    assert '\n' not in message

    # Faster R-CNN's file lacks the mask head a Mask R-CNN needs.
    with pytest.raises(CheckpointError, match='missing from the file'):
        load_released_detector(build(entry), str(FIXTURES / MODELS['faster_rcnn_tiny_srf']['checkpoint']))


def test_classes_come_from_the_checkpoint_and_must_match_the_annotations():
    checkpoint = torch.load(FIXTURES / MODELS['faster_rcnn_tiny_srf']['checkpoint'], weights_only=True)
    classes = released_classes(checkpoint)
    assert classes == CLASSES
    check_classes(classes, CLASSES, 'x')
    swapped = CLASSES[:2][::-1] + CLASSES[2:]
    with pytest.raises(CheckpointError, match="label 1: file 'person' vs annotations 'bicycle'"):
        check_classes(classes, swapped, 'x')
    with pytest.raises(CheckpointError, match='80.*79'):
        check_classes(classes, CLASSES[:-1], 'x')


def test_box_decoding_clamps_both_sides_and_pasting_uses_float_boxes():
    """Two of the five test-path differences, on values where stock torchvision differs."""
    coder = MMBoxCoder()
    box = torch.tensor([[10., 10., 30., 50.]])
    # dw = -10 is clamped to -log(1000/16): width 20 * 16/1000, centred at 20.
    decoded = coder.decode_single(torch.tensor([[0., 0., -10., 0.]]), box)
    assert decoded[0, 2] - decoded[0, 0] == pytest.approx(20 * 16 / 1000, rel=1e-5)
    # A mask of ones pasted at a box from x = 2.4 to 5.6 covers pixels 2..5 (centres 2.5..5.5); the
    # pixels one beyond are sampled at the mask's edge (half weight at most: below 0.5).
    pasted = paste_masks(torch.ones(1, 28, 28), torch.tensor([[2.4, 2.4, 5.6, 5.6]]), 10, 10)[0]
    assert pasted[2:6, 2:6].all() and pasted.sum() == 16


# COCO's category ids of the 80 classes, in label order.
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def write_reference_coco(root: Path, entry: dict, photos: dict) -> dict:
    """A COCO-layout validation set of the two photographs (lossless PNG) whose ground truth is
    mmdetection's own detections (boxes, masks, COCO category ids), and those detections as COCO
    results: the AP our evaluation must print is the one COCOeval gives mmdetection's results."""
    from PIL import Image
    (root / 'val2017').mkdir(parents=True)
    (root / 'annotations').mkdir()
    images, annotations, results = [], [], []
    for image_id, (photo, ref) in enumerate(entry['detections'].items(), start=1):
        Image.fromarray(photos[photo]).save(root / 'val2017' / f'{photo}.png')
        h, w = ref['ori_shape']
        images.append({'id': image_id, 'file_name': f'{photo}.png', 'height': h, 'width': w})
        for box, score, label, rle in zip(ref['boxes'], ref['scores'], ref['labels'], ref['masks']):
            xywh = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            common = {'image_id': image_id, 'category_id': COCO_IDS[label], 'bbox': xywh}
            annotations.append({**common, 'id': len(annotations) + 1, 'iscrowd': 0, 'segmentation': rle,
                                'area': float(mask_util.area({'size': rle['size'],
                                                              'counts': rle['counts'].encode('ascii')}))})
            results.append({**common, 'score': score, 'segmentation': rle})
    categories = [{'id': i, 'name': n} for i, n in zip(COCO_IDS, CLASSES)]
    (root / 'annotations' / 'instances_val2017.json').write_text(json.dumps(
        {'images': images, 'annotations': annotations, 'categories': categories}))
    return results


def test_eval_of_a_released_checkpoint_prints_mmdetections_ap(tmp_path, photos):
    """python -m detection --eval --pretrained <released file>: the AP of mmdetection's detections."""
    import subprocess
    import sys
    from pycocotools.coco import COCO
    from detection.evaluation import coco_metrics
    entry = MODELS['mask_rcnn_tiny_srf']
    results = write_reference_coco(tmp_path / 'coco', entry, photos)
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / 'coco' / 'annotations' / 'instances_val2017.json'))
    expected = coco_metrics(gt, results, ('bbox', 'segm'))
    cfg = ROOT / 'configs' / 'detection' / 'mask_rcnn_focalnet_tiny_srf_1x.yaml'
    opts = ['MODEL.FOCAL.EMBED_DIM', '8', 'MODEL.FOCAL.DEPTHS', '[1, 1, 2, 1]',
            'DETECTION.FPN_CHANNELS', '16', 'DETECTION.BOX_HEAD_DIM', '32', 'DETECTION.MASK_HEAD_DIM', '16',
            'DATA.NUM_WORKERS', '0']
    proc = subprocess.run([sys.executable, '-m', 'detection', '--cfg', str(cfg), '--data-path',
                           str(tmp_path / 'coco'), '--eval', '--pretrained',
                           str(FIXTURES / entry['checkpoint']), '--output', str(tmp_path / 'out'),
                           '--opts', *opts], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(__import__('os').environ, OMP_NUM_THREADS='2'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert 'loaded the whole detector' in log and 'Average Precision' in log
    record = json.loads(next((tmp_path / 'out').rglob('metrics.jsonl')).read_text().splitlines()[-1])
    for key in ('bbox_ap', 'bbox_ap50', 'segm_ap', 'segm_ap75'):
        assert record[key] == pytest.approx(expected[key], abs=1e-6), key
    assert record['bbox_ap'] > 90  # the reference's own detections: nearly all matched

    # The same file under other class names: one line, status 2.
    data = json.loads((tmp_path / 'coco' / 'annotations' / 'instances_val2017.json').read_text())
    data['categories'][0]['name'] = 'human'
    (tmp_path / 'coco' / 'annotations' / 'instances_val2017.json').write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, '-m', 'detection', '--cfg', str(cfg), '--data-path',
                           str(tmp_path / 'coco'), '--eval', '--pretrained',
                           str(FIXTURES / entry['checkpoint']), '--output', str(tmp_path / 'out2'),
                           '--opts', *opts], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "label 1: file 'person' vs annotations 'human'" in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_weight_decay_groups_are_the_official_configs():
    """The parameters without weight decay are those mmengine's optimizer constructor spares for the
    official paramwise_cfg (names mapped through the checkpoint table)."""
    import re
    from detection.recipe import decay_groups
    entry = MODELS['mask_rcnn_tiny_srf']
    model = build(entry)
    expected = set()
    for name in entry['undecayed']:
        for theirs, ours, _ in KEY_MAP:
            if re.fullmatch(theirs, name):
                expected.add(re.sub(theirs, ours, name))
    decayed, spared = decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in spared['params']} == expected
    assert decayed['weight_decay'] == 0.05 and spared['weight_decay'] == 0.0
    assert len(decayed['params']) + len(spared['params']) == len(list(model.parameters()))
    assert any(n.endswith('.bias') for n in (names[id(p)] for p in decayed['params']))


def test_batches_hold_one_orientation():
    from torch.utils.data import SequentialSampler
    from detection.recipe import AspectRatioBatchSampler
    groups = [0, 1, 0, 1, 1, 0, 1, 1, 0]
    batches = list(AspectRatioBatchSampler(SequentialSampler(groups), groups, 2))
    # Batches of one orientation as they fill; index 7 is left over and dropped (as drop_last).
    assert batches == [[0, 2], [1, 3], [4, 6], [5, 8]]
    batches = list(AspectRatioBatchSampler(SequentialSampler(groups[:6]), groups[:6], 2))
    assert batches == [[0, 2], [1, 3], [5, 4]]  # the leftovers mix, in the last batch only


def test_detection_table_says_where_its_map_comes_from(tmp_path, capsys):
    """The paper's mAP always; ours only from a recorded --eval of a released checkpoint."""
    from tools import benchmark
    assert benchmark.main(['--table', 'detection', '--json', str(tmp_path / 'rows.json')]) == 0
    out = capsys.readouterr().out
    assert 'No released checkpoint has been evaluated here' in out
    rows = {r['config']: r for r in json.loads((tmp_path / 'rows.json').read_text())}
    mask_rcnn_rows = [r for name, r in rows.items() if name.startswith('mask_rcnn_')]
    assert len(mask_rcnn_rows) == 6  # the other methods' rows carry the paper's 3x box mAP only
    assert all(r['ours_box_map_1x'] is None and r['paper_box_map_1x'] for r in mask_rcnn_rows)

    records = [{'epoch': 0, 'bbox_ap': 99.0},  # a training record: not an evaluation
               {'mode': 'eval', 'model': 'mask_rcnn_focalnet_tiny_srf_1x', 'released': False, 'bbox_ap': 1.0},
               {'mode': 'eval', 'model': 'mask_rcnn_focalnet_tiny_srf_1x', 'released': True,
                'checkpoint': 'mask_rcnn_tiny_srf_1x.pth', 'bbox_ap': 45.93, 'segm_ap': 41.27}]
    (tmp_path / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in records) + '\n')
    assert benchmark.main(['--table', 'detection', '--released-evals', str(tmp_path / 'metrics.jsonl'),
                           '--json', str(tmp_path / 'rows.json')]) == 0
    out = capsys.readouterr().out
    rows = {r['config']: r for r in json.loads((tmp_path / 'rows.json').read_text())}
    assert rows['mask_rcnn_focalnet_tiny_srf']['ours_box_map_1x'] == 45.93
    assert rows['mask_rcnn_focalnet_tiny_srf']['ours_box_map_3x'] is None
    assert rows['mask_rcnn_focalnet_base_lrf']['ours_box_map_1x'] is None
    assert '| 45.9 / 41.3 |' in out and 'No released checkpoint' not in out

    (tmp_path / 'bad.jsonl').write_text('not json\n')
    assert benchmark.main(['--table', 'detection', '--released-evals', str(tmp_path / 'bad.jsonl')]) == 2
    assert 'line 1 is not JSON' in capsys.readouterr().err


def test_released_files_are_recognised_with_their_optimizer_entry(tmp_path):
    """A released training checkpoint may carry its optimizer state; it loads all the same, and only
    whole two-stage detectors count as released files (--eval --resume takes either kind)."""
    from detection.checkpoint import is_released_file
    entry = MODELS['mask_rcnn_tiny_srf']
    checkpoint = torch.load(FIXTURES / entry['checkpoint'], weights_only=True)
    checkpoint['optimizer'] = {'state': {0: {'step': torch.tensor(5.0), 'exp_avg': torch.zeros(3)}},
                               'param_groups': [{'lr': 1e-4, 'weight_decay': 0.05, 'params': [0]}]}
    checkpoint['meta'] = dict(checkpoint['meta'], epoch=12, iter=87960, mmcv_version='1.7.0',
                              config='model = dict(type="MaskRCNN")')
    torch.save(checkpoint, tmp_path / 'with_optimizer.pth')
    assert is_released_file(str(tmp_path / 'with_optimizer.pth'))
    report = load_released_detector(build(entry), str(tmp_path / 'with_optimizer.pth'), CLASSES)
    assert report['layout'] == 'mmdetection' and report['classes'] == CLASSES

    backbone_only = {k: v for k, v in checkpoint['state_dict'].items() if k.startswith('backbone.')}
    torch.save({'meta': {}, 'state_dict': backbone_only}, tmp_path / 'backbone.pth')
    torch.save({'model': build(entry).state_dict(), 'epoch': 3}, tmp_path / 'ours.pth')
    assert not is_released_file(str(tmp_path / 'backbone.pth'))
    assert not is_released_file(str(tmp_path / 'ours.pth'))
    assert not is_released_file(str(tmp_path / 'missing.pth'))
