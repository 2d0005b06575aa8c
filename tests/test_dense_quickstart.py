"""The dense quick starts of docs/detection.md and docs/segmentation.md, run exactly as written there
(in a fresh folder, with the repository's configs/ linked in), and what they must reach: Mask R-CNN
above 40 box and mask AP, ATSS above 40 box AP, UPerNet above 80 mIoU with every class above 50 IoU
on the shapes sets. Then the predictions of the trained models: the COCO results that ``python -m
detection.predict`` writes score, under pycocotools, the AP that the run logged; the palette PNGs of
``python -m segmentation.predict`` score the logged mIoU; ``--eval --show-dir`` draws every
validation image; real photos go through both."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

# pycocotools 2.0 calls numpy in a way numpy 2 deprecates; nothing here depends on it.
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

# The commands as docs/detection.md and docs/segmentation.md show them, in order.
# One thread per run, as the pages say to set on a machine that other jobs share.
THREADS = 'export OMP_NUM_THREADS=1'
DETECTION = [
    THREADS,
    'python -m data.export_shapes coco shapes_coco',
    'python -m detection --cfg configs/demo/mask_rcnn_shapes.yaml --data-path shapes_coco --output output',
    'python -m detection --cfg configs/demo/atss_shapes.yaml --data-path shapes_coco --output output',
]
DETECTION_PREDICT = ('python -m detection.predict --checkpoint output/mask_rcnn_shapes/default/ckpt_epoch_7.pth '
                     'shapes_coco/val2017 --output-dir predictions')
ATSS_PREDICT = ('python -m detection.predict --checkpoint output/atss_shapes/default/ckpt_epoch_7.pth '
                'shapes_coco/val2017 --output-dir predictions_atss')
DETECTION_SHOW = ('python -m detection --cfg configs/demo/mask_rcnn_shapes.yaml --data-path shapes_coco --output output '
                  '--eval --resume output/mask_rcnn_shapes/default/ckpt_epoch_7.pth --show-dir shown')
SEGMENTATION = [
    THREADS,
    'python -m data.export_shapes ade shapes_ade',
    'python -m segmentation --cfg configs/demo/upernet_shapes.yaml --data-path shapes_ade --output output',
]
SEGMENTATION_PREDICT = ('python -m segmentation.predict --checkpoint output/upernet_shapes/default/ckpt_iter_200.pth '
                        'shapes_ade/images/validation --output-dir segmented')
SEGMENTATION_SHOW = ('python -m segmentation --cfg configs/demo/upernet_shapes.yaml --data-path shapes_ade '
                     '--output output --eval --resume output/upernet_shapes/default/ckpt_iter_200.pth --show-dir shown')


# What the documented ``export NAME=value`` lines set, for the commands after them.
EXPORTED = {}


def shell(folder: Path, command: str, check: bool = True) -> subprocess.CompletedProcess:
    """``command`` as a user types it in ``folder`` (python is this interpreter; the repository is
    importable and its configs/ linked in, as in a checkout). An ``export NAME=value`` line sets the
    variable for the commands that follow, as in the user's shell."""
    argv = shlex.split(command)
    if argv[0] == 'export':
        EXPORTED.update(a.split('=', 1) for a in argv[1:])
        return subprocess.CompletedProcess(argv, 0, '', '')
    assert argv[0] == 'python'
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED='1', **EXPORTED)
    env.pop('FOCALNET_FAULT', None)
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=1800)
    if check:
        assert proc.returncode == 0, f'{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}'
    return proc


def fresh_folder(tmp_path_factory, name: str) -> Path:
    folder = tmp_path_factory.mktemp(name)
    (folder / 'configs').symlink_to(ROOT / 'configs')
    return folder


def records(run: Path):
    return [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]


def test_the_quick_start_commands_are_the_documented_ones():
    """The task pages show every command this file runs, and the README's quick start the training ones."""
    def lines(path):
        return [line.strip() for line in (ROOT / path).read_text().splitlines()]
    detection, segmentation, readme = lines('docs/detection.md'), lines('docs/segmentation.md'), lines('README.md')
    for command in DETECTION + [DETECTION_PREDICT, ATSS_PREDICT, DETECTION_SHOW]:
        assert command in detection, command
    for command in SEGMENTATION + [SEGMENTATION_PREDICT, SEGMENTATION_SHOW]:
        assert command in segmentation, command
    for command in DETECTION + SEGMENTATION:
        assert command in readme, command


# ---------------------------------------------------------------------------------- detection

@pytest.fixture(scope='module')
def detection_runs(tmp_path_factory) -> Path:
    folder = fresh_folder(tmp_path_factory, 'quickstart_detection')
    for command in DETECTION:
        shell(folder, command)
    return folder


def test_mask_rcnn_learns_the_shapes(detection_runs):
    run = detection_runs / 'output' / 'mask_rcnn_shapes' / 'default'
    history = records(run)
    last = history[-1]
    assert last['epoch'] == 7 and last['train_loss'] < history[0]['train_loss']
    assert last['bbox_ap'] > 40 and last['segm_ap'] > 40, last
    names = ['disk', 'square', 'triangle']
    for key in ('bbox_ap_per_class', 'segm_ap_per_class'):
        assert list(last[key]) == names
        assert all(v is not None and 0 <= v <= 100 for v in last[key].values())
    log = (run / 'log_rank0.txt').read_text()
    assert 'AP per category' in log and all(f'  {n}  ' in log for n in names)


def test_atss_learns_the_shapes(detection_runs):
    run = detection_runs / 'output' / 'atss_shapes' / 'default'
    history = records(run)
    last = history[-1]
    assert last['epoch'] == 7 and last['train_loss'] < history[0]['train_loss']
    assert last['bbox_ap'] > 40 and 'segm_ap' not in last, last
    assert list(last['bbox_ap_per_class']) == ['disk', 'square', 'triangle']
    assert all(v is not None and 0 <= v <= 100 for v in last['bbox_ap_per_class'].values())


@pytest.mark.parametrize('command, out, run, iou_types', [
    (DETECTION_PREDICT, 'predictions', 'mask_rcnn_shapes', ('bbox', 'segm')),
    (ATSS_PREDICT, 'predictions_atss', 'atss_shapes', ('bbox',)),
], ids=['mask_rcnn', 'atss'])
def test_detection_predictions_score_the_logged_ap(detection_runs, command, out, run, iou_types):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    shell(detection_runs, command)
    out = detection_runs / out
    images = json.loads((out / 'images.json').read_text())
    results = json.loads((out / 'results.json').read_text())
    gt = COCO(str(detection_runs / 'shapes_coco' / 'annotations' / 'instances_val2017.json'))
    by_file = {img['file_name']: img['id'] for img in gt.imgs.values()}
    ids = {img['id']: by_file[Path(img['file_name']).name] for img in images}
    assert len(ids) == 16 and len(list(out.glob('*.jpg'))) == 16
    for r in results:
        r['image_id'] = ids[r['image_id']]
    logged = records(detection_runs / 'output' / run / 'default')[-1]
    assert all(('segmentation' in r) == ('segm' in iou_types) for r in results)
    for iou_type in iou_types:
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert 100 * evaluator.stats[0] == pytest.approx(logged[f'{iou_type}_ap'], abs=0.05)
    # The drawing is the image with something on it: boxes, labels (and masks) change pixels.
    drawn = np.asarray(Image.open(out / '000000000002.jpg'), dtype=np.float32)
    source = np.asarray(Image.open(detection_runs / 'shapes_coco' / 'val2017' / '000000000002.jpg'), dtype=np.float32)
    assert drawn.shape == source.shape and np.abs(drawn - source).mean() > 2


def test_eval_show_dir_draws_every_validation_image(detection_runs):
    shell(detection_runs, DETECTION_SHOW)
    assert len(list((detection_runs / 'shown').glob('*.jpg'))) == 16
    ev = records(detection_runs / 'output' / 'mask_rcnn_shapes' / 'default')[-1]
    assert ev['mode'] == 'eval' and list(ev['segm_ap_per_class']) == ['disk', 'square', 'triangle']


def test_detection_predict_on_real_photos(detection_runs, photo_folder):
    photos = photo_folder(4)
    shell(detection_runs, f'python -m detection.predict --checkpoint '
                          f'output/mask_rcnn_shapes/default/ckpt_epoch_7.pth {photos}/train '
                          f'"{photos}/train/china/*.jpg" --output-dir photos_out --score-thresh 0.05')
    out = detection_runs / 'photos_out'
    assert len(list(out.glob('*.jpg'))) == 4  # the glob's two are the folder's: not drawn twice
    assert len(json.loads((out / 'images.json').read_text())) == 4


# ---------------------------------------------------------------------------------- segmentation

@pytest.fixture(scope='module')
def segmentation_run(tmp_path_factory) -> Path:
    folder = fresh_folder(tmp_path_factory, 'quickstart_segmentation')
    for command in SEGMENTATION:
        shell(folder, command)
    return folder


def test_upernet_learns_the_shapes(segmentation_run):
    run = segmentation_run / 'output' / 'upernet_shapes' / 'default'
    (last,) = records(run)
    assert last['iter'] == 200 and last['miou'] > 80, last
    names = ['photo', 'disk', 'square', 'triangle']
    assert list(last['iou_per_class']) == names and list(last['acc_per_class']) == names
    assert all(v is not None and v > 50 for v in last['iou_per_class'].values()), last['iou_per_class']
    log = (run / 'log_rank0.txt').read_text()
    assert 'IoU and Acc per class' in log and '  triangle  ' in log


def test_segmentation_predictions_score_the_logged_miou(segmentation_run):
    from segmentation.classes import palette
    from segmentation.data import reduce_zero_label
    from segmentation.metrics import SegmentationMetric
    import torch
    shell(segmentation_run, SEGMENTATION_PREDICT)
    out = segmentation_run / 'segmented'
    metric = SegmentationMetric(4)
    labels = sorted((segmentation_run / 'shapes_ade' / 'annotations' / 'validation').glob('*.png'))
    assert len(labels) == 16
    for label_path in labels:
        png = Image.open(out / label_path.name)
        assert png.mode == 'P' and png.getpalette()[:12] == palette(4).ravel().tolist()
        label = reduce_zero_label(np.asarray(Image.open(label_path)))
        metric.update(torch.from_numpy(np.asarray(png).astype(np.int64)), torch.from_numpy(label.astype(np.int64)))
        assert (out / f'{label_path.stem}_overlay.jpg').is_file()
    (logged,) = records(segmentation_run / 'output' / 'upernet_shapes' / 'default')
    assert metric.compute()['miou'] == pytest.approx(logged['miou'], abs=1e-6)


def test_segmentation_eval_show_dir(segmentation_run):
    shell(segmentation_run, SEGMENTATION_SHOW)
    assert len(list((segmentation_run / 'shown').glob('*.jpg'))) == 16
    ev = records(segmentation_run / 'output' / 'upernet_shapes' / 'default')[-1]
    assert ev['mode'] == 'eval' and list(ev['iou_per_class']) == ['photo', 'disk', 'square', 'triangle']


def test_segmentation_predict_on_real_photos(segmentation_run, photo_folder):
    photos = photo_folder(4)
    proc = shell(segmentation_run, f'python -m segmentation.predict --checkpoint '
                                   f'output/upernet_shapes/default/ckpt_iter_200.pth {photos}/train --output-dir photos_seg')
    pngs = sorted((segmentation_run / 'photos_seg').glob('*.png'))
    assert len(pngs) == 4 and 'photo' in proc.stdout
    for png in pngs:
        source = next((photos / 'train').rglob(png.stem + '.jpg'))
        assert Image.open(png).size == Image.open(source).size
