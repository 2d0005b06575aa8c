"""The detectors written with mmdetection's names (detection/atss.py ...): against mmdetection's own
detections and losses (fixtures made by tests/mmref/make_mmdet_fixtures_detmore.py), strict loading
of released checkpoints, learning from scratch on a synthetic COCO-layout set, the cost table. CPU only."""
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from conftest import ROOT, torch_threads
from test_detection import detection, records
from tiny_runs import start_ranks

from config import load_config
from detection.evaluation import coco_metrics, to_coco_results
from detection.layers import Batch
from detection.model import build_detector
from detection.released import load_released
from models.pretrained import CheckpointError

pytestmark = [pytest.mark.filterwarnings('ignore::DeprecationWarning'), pytest.mark.usefixtures('fixture_threads')]

FIXTURES = ROOT / 'tests' / 'fixtures' / 'mmdet'
# The fixtures' architecture (tests/mmref/make_mmdet_fixtures_detmore.py): the official config with a
# narrow backbone and neck, COCO's 80 classes, the test scale (400, 256).
FIXTURE_OPTS = ['MODEL.FOCAL.EMBED_DIM', '8', 'MODEL.FOCAL.DEPTHS', '[1, 1, 2, 1]', 'MODEL.DROP_PATH_RATE', '0.0',
                'DETECTION.FPN_CHANNELS', '32', 'DETECTION.MIN_SIZE_TEST', '256', 'DETECTION.MAX_SIZE', '400']
# mmdetection's preprocessing constants (0-255 RGB), applied to its resized images as it does.
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def load_fixture(method: str) -> dict:
    fixture = torch.load(FIXTURES / f'{method}.pt', weights_only=False)
    assert fixture['versions']['mmdet'] == '3.3.0'
    return fixture


# Per method, what else its fixture narrowed; the samplers take every candidate (as the generator's).
METHOD_OPTS = {'atss': [],
               'cascade_mask_rcnn': ['DETECTION.FPN_CHANNELS', '16', 'DETECTION.BOX_HEAD_DIM', '32',
                                     'DETECTION.RPN_BATCH_SIZE', '1000000', 'DETECTION.ROI_BATCH_SIZE', '100000'],
               'sparse_rcnn': ['DETECTION.FPN_CHANNELS', '16', 'DETECTION.SPARSE.FFN_CHANNELS', '64',
                               'DETECTION.SPARSE.DYNAMIC_CHANNELS', '8']}


def fixture_model(method: str, fixture: dict):
    config = load_config(str(ROOT / f'configs/detection/{method}_focalnet_tiny_srf_3x.yaml'),
                         FIXTURE_OPTS + METHOD_OPTS[method])
    model = build_detector(config, 80)
    report = load_released(model, fixture['checkpoint']['state_dict'], model.released_keys)
    assert report['num_tensors'] == len(model.state_dict())
    return model


def pack(images, shapes, pads, scales, originals, **targets) -> Batch:
    """mmdetection's data preprocessor on its resized uint8 RGB images: normalise, pad to the batch."""
    xs = [(im.permute(2, 0, 1).float() - MEAN) / STD for im in images]
    H = max(math.ceil(x.shape[1] / 32) * 32 for x in xs)
    W = max(math.ceil(x.shape[2] / 32) * 32 for x in xs)
    tensor = torch.zeros(len(xs), 3, H, W)
    for i, x in enumerate(xs):
        tensor[i, :, :x.shape[1], :x.shape[2]] = x
    return Batch(tensor, [tuple(s) for s in shapes], [tuple(p) for p in pads], [tuple(s) for s in scales],
                 [tuple(o) for o in originals], **targets)


def predict(model, image: torch.Tensor, meta: dict) -> dict:
    """Our detections for one of the fixture's resized photographs, packed as mmdetection packed it."""
    batch = pack([image], [meta['img_shape']], [meta['pad_shape']], [meta['scale_factor']], [meta['ori_shape']])
    with torch.no_grad():
        return model.predict_batch(batch)[0]


def training_batch(fixture: dict, **targets) -> Batch:
    """The fixture's training batch (both photographs, its fixed boxes and labels) as mmdetection
    packed it: unscaled, the narrower image padded."""
    t = fixture['train']
    shapes = [m['img_shape'] for m in t['metas']]
    return pack(fixture['images'], shapes, [m['pad_shape'] for m in t['metas']], [(1.0, 1.0)] * 2, shapes,
                boxes=[b.float() for b in t['boxes']], labels=list(t['labels']), **targets)


def stage_losses(fixture: dict) -> dict:
    """mmdetection's losses of a multi-stage head under our names: its s{i}.loss_{part} are our
    loss_s{i}_{part}; its s{i}.acc accuracies are not losses."""
    return {re.sub(r'^s(\d)\.loss_(\w+)$', r'loss_s\1_\2', k): v
            for k, v in fixture['train']['losses'].items() if 'loss' in k}


def check_losses_and_gradients(model, losses: dict, expected: dict, abs_tol=None):
    """Each loss equals mmdetection's (relative 1e-5, and ``abs_tol`` for values near zero; None is
    pytest's default), and their sum reaches every parameter."""
    assert set(losses) == set(expected)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5, abs=abs_tol), name
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def assert_same_detections(ours: dict, theirs: dict):
    """Labels equal, boxes within 1e-3 px, scores within 1e-5, in mmdetection's order."""
    assert len(ours['boxes']) == len(theirs['boxes']) > 20
    assert torch.equal(ours['labels'] - 1, theirs['labels'])
    assert (ours['boxes'] - theirs['boxes']).abs().max() < 1e-3
    assert (ours['scores'] - theirs['scores']).abs().max() < 1e-5


# ---------------------------------------------------------------------------------- ATSS

def test_atss_gives_mmdetections_detections_on_photographs():
    """The official ATSS config with random weights, saved by mmdetection and loaded here strictly:
    the same detections on two photographs, one resized by the test scale (240x360 -> 256x384) and
    one already at it; our resize arrives at mmdetection's size and scale factors."""
    fixture = load_fixture('atss')
    model = fixture_model('atss', fixture).eval()
    for image, meta, theirs in zip(fixture['images'], fixture['metas'], fixture['detections']):
        H, W = meta['ori_shape']
        assert model.transform.new_size(H, W, model.transform.test_size) == meta['img_shape']
        h, w = meta['img_shape']
        assert (w / W, h / H) == pytest.approx(meta['scale_factor'], abs=0)
        ours = predict(model, image, meta)
        assert_same_detections(ours, theirs)


def test_atss_training_step_gives_mmdetections_assignment_and_losses():
    """Both photographs as one batch (the narrower one padded: its anchors on the padding are left
    out), fixed boxes: ATSS assigns every anchor the class mmdetection assigns, and the focal, GIoU and
    centre-ness losses are mmdetection's."""
    fixture = load_fixture('atss')
    model = fixture_model('atss', fixture).train()
    t = fixture['train']
    batch = training_batch(fixture)
    head = model.bbox_head
    outs = head(model.features(batch.tensor))
    sizes = [tuple(c.shape[-2:]) for c in outs[0]]
    labels, _, pos = head.targets(torch.cat(head.anchors(sizes, 'cpu')), sizes, batch)
    assert torch.equal(labels, t['assignment'].long())
    assert 20 < sum(len(idx) for _, idx, _ in pos) < 200
    check_losses_and_gradients(model, model.loss_batch(batch), t['losses'])


def test_released_atss_loads_strictly_or_names_what_does_not_fit():
    fixture = load_fixture('atss')
    model = fixture_model('atss', fixture)
    state = dict(fixture['checkpoint']['state_dict'])
    state.pop('bbox_head.atss_centerness.bias')
    state['bbox_head.extra.weight'] = torch.zeros(1)
    state['roi_head.x'] = torch.zeros(1)
    state['neck.fpn_convs.0.conv.weight'] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(CheckpointError) as e:
        load_released(model, state, model.released_keys, 'atss.pth')
    message = str(e.value)
    assert '\n' not in message
    for part in ('1 missing from the file: bbox_head.atss_centerness.bias',
                 '2 unexpected in the file: roi_head.x [1], bbox_head.extra.weight [1]',
                 '1 of another shape: neck.fpn_convs.0.conv.weight file [32, 32, 1, 1] vs model [32, 32, 3, 3]'):
        assert part in message, message


def test_eval_of_a_released_atss_checkpoint(coco_root, tmp_path):
    """`--eval --pretrained <released file>` evaluates the whole released detector (loaded strictly);
    a bare backbone file is refused in one line."""
    fixture = load_fixture('atss')
    torch.save(fixture['checkpoint'], tmp_path / 'atss_released.pth')
    # The released head has 80 classes; the synthetic set has 3, so the class layer does not fit.
    proc = detection(['--cfg', 'configs/detection/atss_focalnet_tiny_srf_3x.yaml', '--data-path', str(coco_root),
                      '--output', str(tmp_path), '--eval', '--pretrained', str(tmp_path / 'atss_released.pth'),
                      '--opts', *FIXTURE_OPTS], check=False)
    assert proc.returncode == 2
    assert re.search(r'of another shape: bbox_head\.atss_cls\.weight file \[80, 32, 3, 3\] vs model \[3, 32, 3, 3\]',
                     proc.stderr), proc.stderr[-2000:]
    state = {k: v[:3] if k.startswith('bbox_head.atss_cls') else v
             for k, v in fixture['checkpoint']['state_dict'].items()}
    torch.save({'meta': {}, 'state_dict': state}, tmp_path / 'atss_3.pth')
    detection(['--cfg', 'configs/detection/atss_focalnet_tiny_srf_3x.yaml', '--data-path', str(coco_root),
               '--output', str(tmp_path), '--eval', '--pretrained', str(tmp_path / 'atss_3.pth'),
               '--opts', *FIXTURE_OPTS])
    run = tmp_path / 'atss_focalnet_tiny_srf_3x' / 'default'
    record = records(run)[-1]
    assert record['mode'] == 'eval' and record['images'] == 24 and 'bbox_ap' in record
    assert 'loaded the whole released detector (153 tensors)' in (run / 'log_rank0.txt').read_text()


# ---------------------------------------------------------------------------------- Cascade Mask R-CNN

def test_cascade_mask_rcnn_gives_mmdetections_detections_and_masks_on_photographs():
    """The official Cascade Mask R-CNN config (BN for SyncBN) with random weights, running statistics
    included: mmdetection's boxes, scores, labels and masks (pasted at the photograph's own size)."""
    from pycocotools import mask as mask_util
    fixture = load_fixture('cascade_mask_rcnn')
    model = fixture_model('cascade_mask_rcnn', fixture).eval()
    for image, meta, theirs in zip(fixture['images'], fixture['metas'], fixture['detections']):
        ours = predict(model, image, meta)
        assert_same_detections(ours, theirs)
        masks = torch.from_numpy(mask_util.decode(theirs['masks'])).permute(2, 0, 1).bool()
        assert ours['masks'].shape == (len(masks), 1, *meta['ori_shape'])
        mine = ours['masks'][:, 0] > 0.5
        inter = (mine & masks).flatten(1).sum(1)
        union = (mine | masks).flatten(1).sum(1)
        same = (inter == union) | (inter >= 0.999 * union)
        assert same.float().mean() >= 0.99 and union.sum() > 0


def test_cascade_mask_rcnn_training_step_gives_mmdetections_losses():
    """Both photographs as one batch with boxes and masks: the RPN's and every stage's classification,
    GIoU and mask losses are mmdetection's (every candidate sampled, so no random draw differs)."""
    fixture = load_fixture('cascade_mask_rcnn')
    model = fixture_model('cascade_mask_rcnn', fixture).train()
    t = fixture['train']
    shapes = [m['img_shape'] for m in t['metas']]
    masks = [torch.from_numpy(np.unpackbits(m.numpy(), axis=-1)[..., :s[1]]) for m, s in zip(t['masks'], shapes)]
    check_losses_and_gradients(model, model.loss_batch(training_batch(fixture, masks=masks)), stage_losses(fixture),
                               abs_tol=1e-7)


# ---------------------------------------------------------------------------------- Sparse R-CNN

# The thread count the Sparse R-CNN fixture was made with (tests/mmref/make_mmdet_fixtures_detmore.py
# THREADS), set inside the module's pin (conftest.fixture_threads) and undone after the test.
SPARSE_THREADS = 1


@pytest.fixture
def sparse_threads():
    with torch_threads(SPARSE_THREADS):
        yield


def match_detections(ours: dict, theirs: dict):
    """Every detection of ours is one of mmdetection's (same label, box within 1e-3 px, score within
    1e-5) and the other way round. mmdetection's top-k is unsorted, ours sorted by score: the sets
    are compared."""
    assert len(ours['boxes']) == len(theirs['boxes']) == 300
    unused = torch.ones(len(theirs['boxes']), dtype=torch.bool)
    for box, score, label in zip(ours['boxes'], ours['scores'], ours['labels'] - 1):
        same = (unused & (theirs['labels'] == label) & ((theirs['boxes'] - box).abs().max(1)[0] < 1e-3)
                & ((theirs['scores'] - score).abs() < 1e-5))
        assert same.any(), (box, score, label)
        unused[same.nonzero()[0, 0]] = False
    assert not unused.any()


def test_sparse_rcnn_gives_mmdetections_detections_on_photographs(sparse_threads):
    """The official Sparse R-CNN config (300 proposals, six stages) with random weights, saved by
    mmdetection and loaded here strictly: the same 300 detections on each photograph."""
    fixture = load_fixture('sparse_rcnn')
    model = fixture_model('sparse_rcnn', fixture).eval()
    for image, meta, theirs in zip(fixture['images'], fixture['metas'], fixture['detections']):
        ours = predict(model, image, meta)
        assert torch.equal(ours['scores'], ours['scores'].sort(descending=True)[0])
        match_detections(ours, theirs)


def test_sparse_rcnn_training_step_gives_mmdetections_matching_and_losses(sparse_threads):
    """Both photographs as one batch with fixed boxes: at every stage the Hungarian matching gives
    each proposal the box mmdetection gives it, and the focal, L1 and GIoU losses are mmdetection's."""
    from detection.sparse_rcnn import hungarian_match
    fixture = load_fixture('sparse_rcnn')
    model = fixture_model('sparse_rcnn', fixture).train()
    t = fixture['train']
    batch = training_batch(fixture)
    matches = []

    def recording(*args, **kwargs):
        rows, cols = hungarian_match(*args, **kwargs)
        gt_inds = torch.zeros(len(args[0]), dtype=torch.long)
        gt_inds[rows] = cols + 1
        matches.append(gt_inds)
        return rows, cols
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr('detection.sparse_rcnn.hungarian_match', recording)
        losses = model.loss_batch(batch)
    assert torch.equal(torch.stack(matches).view(6, 2, -1), t['assignment'].long())
    expected = stage_losses(fixture)  # loss_s{i}_{cls,bbox,iou} of 6 stages
    assert len(expected) == 18
    check_losses_and_gradients(model, losses, expected, abs_tol=1e-7)


def test_released_sparse_rcnn_loads_strictly_or_names_what_does_not_fit():
    fixture = load_fixture('sparse_rcnn')
    model = fixture_model('sparse_rcnn', fixture)
    state = dict(fixture['checkpoint']['state_dict'])
    state.pop('rpn_head.init_proposal_features.weight')
    state['roi_head.bbox_head.6.fc_cls.weight'] = torch.zeros(80, 16)
    with pytest.raises(CheckpointError) as e:
        load_released(model, state, model.released_keys, 'sparse.pth')
    message = str(e.value)
    assert '\n' not in message
    for part in ('1 missing from the file: rpn_head.init_proposal_features.weight',
                 '1 unexpected in the file: roi_head.bbox_head.6.fc_cls.weight'):
        assert part in message, message


def test_eval_of_a_released_sparse_rcnn_checkpoint(coco_root, tmp_path):
    """`--eval --pretrained <released file>` evaluates the whole released Sparse R-CNN (its six class
    layers cut to the synthetic set's 3 classes), with the config's 300 detections per image."""
    fixture = load_fixture('sparse_rcnn')
    state = {k: v[:3] if '.fc_cls.' in k else v for k, v in fixture['checkpoint']['state_dict'].items()}
    torch.save({'meta': {}, 'state_dict': state}, tmp_path / 'sparse_3.pth')
    cfg = 'configs/detection/sparse_rcnn_focalnet_tiny_srf_3x.yaml'
    detection(['--cfg', cfg, '--data-path', str(coco_root), '--output', str(tmp_path), '--eval',
               '--pretrained', str(tmp_path / 'sparse_3.pth'), '--opts', *FIXTURE_OPTS, *METHOD_OPTS['sparse_rcnn']])
    run = tmp_path / 'sparse_rcnn_focalnet_tiny_srf_3x' / 'default'
    record = records(run)[-1]
    assert record['mode'] == 'eval' and record['images'] == 24 and 'bbox_ap' in record
    assert f'loaded the whole released detector ({len(state)} tensors)' in (run / 'log_rank0.txt').read_text()


# ---------------------------------------------------------------------------------- learning

# A shrunk detector on 128 px images, one --opts away from the release config.
SHRINK = ['MODEL.FOCAL.EMBED_DIM', '16', 'MODEL.FOCAL.DEPTHS', '[1, 1, 1, 1]', 'MODEL.DROP_PATH_RATE', '0.0',
          'DETECTION.FPN_CHANNELS', '32', 'DETECTION.MIN_SIZE_TRAIN', '[128]', 'DETECTION.MIN_SIZE_TEST', '128',
          'DETECTION.MAX_SIZE', '192', 'DETECTION.CROP_RESIZE', '[]', 'DETECTION.WARMUP_ITERS', '10',
          'TRAIN.BASE_LR', '2e-3', 'TRAIN.BASE_BATCH_SIZE', '4', 'DETECTION.DETECTIONS_PER_IMAGE', '30',
          'DATA.NUM_WORKERS', '1', 'PRINT_FREQ', '10']


def chance_ap(coco_root: Path) -> float:
    """Box AP of 30 random boxes per validation image with random classes and scores."""
    coco = COCO(str(coco_root / 'annotations' / 'instances_val2017.json'))
    categories = sorted(coco.getCatIds())
    g = torch.Generator().manual_seed(0)
    results = []
    for image in coco.dataset['images']:
        W, H = image['width'], image['height']
        xy = torch.rand(30, 2, generator=g) * torch.tensor([W - 28, H - 28])
        wh = 28 + torch.rand(30, 2, generator=g) * 36
        results += to_coco_results(image['id'], {
            'boxes': torch.cat([xy, xy + wh], 1), 'scores': torch.rand(30, generator=g),
            'labels': torch.randint(1, len(categories) + 1, (30,), generator=g)}, categories)
    return coco_metrics(coco, results, ('bbox',))['bbox_ap']


def test_shrunk_atss_learns_from_scratch(coco_root, tmp_path):
    """8 epochs of 16 steps from random weights: box AP far above chance; `--eval --resume` of the
    last checkpoint reproduces the logged AP."""
    out = tmp_path / 'run'
    cfg = 'configs/detection/atss_focalnet_tiny_srf_3x.yaml'
    detection(['--cfg', cfg, '--data-path', str(coco_root), '--output', str(out), '--batch-size', '4',
               '--opts', *SHRINK, 'TRAIN.EPOCHS', '8', 'DETECTION.LR_STEPS', '[7]', 'DETECTION.EVAL_FREQ', '8'])
    run = out / 'atss_focalnet_tiny_srf_3x' / 'default'
    history = records(run)
    last = history[-1]
    chance = chance_ap(coco_root)
    assert chance < 1.0
    assert last['epoch'] == 7 and last['train_loss'] < history[0]['train_loss']
    assert {'loss_cls', 'loss_bbox', 'loss_centerness'} <= set(last)
    assert last['bbox_ap'] > 50 and last['bbox_ap50'] > 80, (last, chance)
    detection(['--cfg', cfg, '--data-path', str(coco_root), '--output', str(out), '--eval',
               '--resume', str(run / 'ckpt_epoch_7.pth'), '--opts', *SHRINK])
    assert records(run)[-1]['bbox_ap'] == pytest.approx(last['bbox_ap'], abs=1e-6)


# Cascade Mask R-CNN shrunk as the Mask R-CNN test shrinks it; 8 epochs of 14 steps (about 3 minutes
# on one core: three RoI stages with adaptive RoIAlign cost more than Mask R-CNN's one).
CASCADE_SHRINK = ['DETECTION.BOX_HEAD_DIM', '128', 'DETECTION.RPN_BATCH_SIZE', '64', 'DETECTION.ROI_BATCH_SIZE', '64',
                  'TRAIN.EPOCHS', '8', 'DETECTION.LR_STEPS', '[7]', 'DETECTION.EVAL_FREQ', '8']
CASCADE_MIN_AP = 30  # box AP 55.5, mask AP 66.7 when written; chance (chance_ap) is 0.1


def test_shrunk_cascade_mask_rcnn_learns_from_scratch(coco_root, tmp_path):
    """From random weights, with masks: box and mask AP far above chance."""
    out = tmp_path / 'run'
    detection(['--cfg', 'configs/detection/cascade_mask_rcnn_focalnet_tiny_srf_3x.yaml', '--data-path', str(coco_root),
               '--output', str(out), '--batch-size', '4', '--opts', *SHRINK, *CASCADE_SHRINK])
    history = records(out / 'cascade_mask_rcnn_focalnet_tiny_srf_3x' / 'default')
    last = history[-1]
    assert last['train_loss'] < history[0]['train_loss']
    assert {'loss_rpn_cls', 'loss_s0_cls', 'loss_s1_bbox', 'loss_s2_mask'} <= set(last)
    assert last['bbox_ap'] > CASCADE_MIN_AP and last['segm_ap'] > CASCADE_MIN_AP, last


# Sparse R-CNN shrunk further: 30 proposals (the images hold 1-3 objects), three stages, narrow FFN
# and dynamic convolution, the rate of the other tests scaled up for the slower set-prediction
# training; 40 epochs of 16 steps (about 2 minutes on one core).
SPARSE_SHRINK = ['DETECTION.SPARSE.NUM_PROPOSALS', '30', 'DETECTION.SPARSE.NUM_STAGES', '3',
                 'DETECTION.SPARSE.FFN_CHANNELS', '64', 'DETECTION.SPARSE.DYNAMIC_CHANNELS', '8',
                 'DETECTION.DETECTIONS_PER_IMAGE', '30', 'TRAIN.BASE_LR', '1e-3']
SPARSE_MIN_AP = 25  # box AP 50.9 (AP50 76.9) when written; chance (chance_ap) is 0.1


def test_shrunk_sparse_rcnn_learns_from_scratch(coco_root, tmp_path):
    """From random weights, Hungarian-matched learned proposals: box AP far above chance; `--eval
    --resume` of the last checkpoint reproduces the logged AP."""
    out = tmp_path / 'run'
    cfg = 'configs/detection/sparse_rcnn_focalnet_tiny_srf_3x.yaml'
    detection(['--cfg', cfg, '--data-path', str(coco_root), '--output', str(out), '--batch-size', '4',
               '--opts', *SHRINK, *SPARSE_SHRINK, 'TRAIN.EPOCHS', '40', 'DETECTION.LR_STEPS', '[34]',
               'DETECTION.EVAL_FREQ', '40'])
    run = out / 'sparse_rcnn_focalnet_tiny_srf_3x' / 'default'
    history = records(run)
    last = history[-1]
    assert last['epoch'] == 39 and last['train_loss'] < history[0]['train_loss'] / 2
    assert {'loss_s0_cls', 'loss_s1_bbox', 'loss_s2_iou'} <= set(last)
    assert last['bbox_ap'] > SPARSE_MIN_AP and last['bbox_ap50'] > 2 * SPARSE_MIN_AP, last
    detection(['--cfg', cfg, '--data-path', str(coco_root), '--output', str(out), '--eval',
               '--resume', str(run / 'ckpt_epoch_39.pth'), '--opts', *SHRINK, *SPARSE_SHRINK])
    assert records(run)[-1]['bbox_ap'] == pytest.approx(last['bbox_ap'], abs=1e-6)


# ---------------------------------------------------------------------------------- configs and cost

@pytest.mark.parametrize('method', ['atss', 'cascade_mask_rcnn'])
def test_configs_hold_the_official_recipes(method):
    for rf, levels in (('srf', 2), ('lrf', 3)):
        c = load_config(str(ROOT / f'configs/detection/{method}_focalnet_tiny_{rf}_3x.yaml'))
        assert c.DETECTION.METHOD == method and c.MODEL.NAME == f'{method}_focalnet_tiny_{rf}_3x'
        assert (c.MODEL.FOCAL.EMBED_DIM, list(c.MODEL.FOCAL.DEPTHS)) == (96, [2, 2, 6, 2])
        assert list(c.MODEL.FOCAL.FOCAL_LEVELS) == [levels] * 4
        assert list(c.MODEL.FOCAL.FOCAL_WINDOWS) == [11, 9, 9, 7] and c.MODEL.DROP_PATH_RATE == 0.3
        assert (c.TRAIN.EPOCHS, list(c.DETECTION.LR_STEPS), c.TRAIN.BASE_LR, c.TRAIN.WEIGHT_DECAY) == (
            36, [27, 33], 1e-4, 0.05)
        assert (c.DETECTION.SCORE_THRESH, c.DETECTION.DETECTIONS_PER_IMAGE, c.DETECTION.MIN_SIZE_TEST,
                c.DETECTION.MAX_SIZE) == (0.05, 100, 800, 1333)


def test_sparse_rcnn_configs_hold_the_official_recipe():
    for rf, levels in (('srf', 2), ('lrf', 3)):
        c = load_config(str(ROOT / f'configs/detection/sparse_rcnn_focalnet_tiny_{rf}_3x.yaml'))
        assert c.DETECTION.METHOD == 'sparse_rcnn' and c.MODEL.NAME == f'sparse_rcnn_focalnet_tiny_{rf}_3x'
        assert (c.MODEL.FOCAL.EMBED_DIM, list(c.MODEL.FOCAL.DEPTHS)) == (96, [2, 2, 6, 2])
        assert list(c.MODEL.FOCAL.FOCAL_LEVELS) == [levels] * 4
        assert list(c.MODEL.FOCAL.FOCAL_WINDOWS) == [11, 9, 9, 7] and c.MODEL.DROP_PATH_RATE == 0.3
        assert (c.TRAIN.EPOCHS, list(c.DETECTION.LR_STEPS), c.TRAIN.BASE_LR, c.TRAIN.WEIGHT_DECAY) == (
            36, [27, 33], 2.5e-5, 1e-4)
        assert (c.TRAIN.CLIP_GRAD, c.DETECTION.DECAY_GROUPS, c.TRAIN.BASE_BATCH_SIZE) == (1.0, 'all', 16)
        assert (c.DETECTION.SPARSE.NUM_PROPOSALS, c.DETECTION.SPARSE.NUM_STAGES, c.DETECTION.DETECTIONS_PER_IMAGE,
                c.DETECTION.MIN_SIZE_TEST, c.DETECTION.MAX_SIZE) == (300, 6, 300, 800, 1333)
        assert list(c.DETECTION.CROP_RESIZE) == [400, 500, 600] and list(c.DETECTION.CROP_SIZE) == [384, 600]


def test_decay_groups_all_decays_every_parameter():
    """DETECTION.DECAY_GROUPS all (the Sparse R-CNN recipe) spares nothing; official spares norms."""
    from detection.recipe import decay_groups
    config = load_config(str(ROOT / 'configs/detection/sparse_rcnn_focalnet_tiny_srf_3x.yaml'),
                         FIXTURE_OPTS + METHOD_OPTS['sparse_rcnn'])
    model = build_detector(config, 3)
    decayed, spared = decay_groups(model, 1e-4, spare=False)
    assert len(decayed['params']) == len(list(model.parameters())) and not spared['params']
    decayed, spared = decay_groups(model, 1e-4)
    assert len(spared['params']) > 0 and spared['weight_decay'] == 0.0


def test_cost_rows_match_the_paper(tmp_path):
    from tools import benchmark
    assert benchmark.main(['--table', 'detection', '--json', str(tmp_path / 'rows.json')]) == 0
    rows = {r['config']: r for r in json.loads((tmp_path / 'rows.json').read_text())}
    for name in ('atss_focalnet_tiny_lrf_3x', 'cascade_mask_rcnn_focalnet_tiny_lrf_3x',
                 'sparse_rcnn_focalnet_tiny_lrf_3x'):
        r = rows[name]
        assert r['params_m'] == pytest.approx(r['paper_params_m'], rel=0.005), name
        assert r['gflops'] == pytest.approx(r['paper_gflops'], rel=0.02), name



def test_a_pyramid_level_no_roi_reads_still_gets_a_gradient():
    """Distributed training needs a gradient for every parameter at every step: a level that no RoI
    reads joins the graph with a zero (the RoI features are unchanged)."""
    from detection.cascade_rcnn import roi_features
    torch.manual_seed(0)
    feats = [torch.randn(1, 4, size, size, requires_grad=True) for size in (40, 20, 10, 5)]
    rois = torch.tensor([[0., 2., 3., 20., 22.], [0., 30., 40., 70., 60.]])  # both on the finest level
    out = roi_features(feats, rois, (4, 8, 16, 32), 7)
    out.square().sum().backward()
    assert [f.grad is not None for f in feats] == [True] * 4
    assert feats[0].grad.abs().sum() > 0 and all(f.grad.abs().sum() == 0 for f in feats[1:])


@pytest.mark.parametrize('seed', [1, 2])
def test_every_sparse_rcnn_parameter_gets_a_gradient(seed):
    """With these seeds the random proposals read no RoI from the coarsest (seed 1) or the finest
    (seed 2) level; training still gives every parameter a gradient, as two ranks of torchrun need."""
    config = load_config(str(ROOT / 'configs/detection/sparse_rcnn_focalnet_tiny_srf_3x.yaml'),
                         [*SHRINK, *SPARSE_SHRINK, 'DETECTION.MIN_SIZE_TRAIN', '[160]'])
    torch.manual_seed(seed)
    model = build_detector(config, 3).train()
    images = [torch.rand(3, 160, 160) for _ in range(2)]
    boxes = torch.tensor([[10., 12., 26., 30.], [60., 70., 74., 82.]])
    targets = [{'boxes': boxes, 'labels': torch.tensor([1, 2])} for _ in images]
    sum(model(images, targets).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize('method', ['atss', 'cascade_mask_rcnn', 'sparse_rcnn'])
def test_two_processes_train_the_method_as_torchrun_starts_them(method, coco_root, tmp_path):
    """Two ranks (the environment torchrun gives each process) train one epoch and evaluate: the
    gradients of every parameter are exchanged at every step, and rank 0 writes the records."""
    argv = ['--cfg', f'configs/detection/{method}_focalnet_tiny_srf_3x.yaml', '--data-path', str(coco_root),
            '--output', str(tmp_path), '--batch-size', '2',
            '--opts', *SHRINK, *SPARSE_SHRINK, 'TRAIN.EPOCHS', '1', 'DETECTION.LR_STEPS', '[]']
    procs = start_ranks(lambda rank: [sys.executable, '-m', 'detection', *argv])
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    run = tmp_path / f'{method}_focalnet_tiny_srf_3x' / 'default'
    (last,) = records(run)
    assert last['epoch'] == 0 and math.isfinite(last['train_loss']) and 'bbox_ap' in last
    assert (run / 'ckpt_epoch_0.pth').is_file() and (run / 'log_rank1.txt').is_file()
