"""Per-class results (AP per category against COCOeval run on that category alone; IoU and Acc per
class with names; undefined values as JSON null) and the pieces of the dense predict commands that
need no trained model: inputs (regular files only), palette PNGs, drawings."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from config import load_config
from conftest import ROOT
from errors import UserError

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


@pytest.fixture(scope='module')
def coco_gt(tmp_path_factory):
    """The detection tests' synthetic split (polygons, both RLE forms, crowds, empty images), with a
    fourth category that no annotation uses."""
    from test_detection import make_split
    root = tmp_path_factory.mktemp('coco')
    make_split(root, 'val2017', 16, np.random.default_rng(4), 50000)
    path = root / 'annotations' / 'instances_val2017.json'
    doc = json.loads(path.read_text())
    doc['categories'].append({'id': 20, 'name': 'star'})
    path.write_text(json.dumps(doc))
    return COCO(str(path))


def noisy_results(coco, rng):
    results = []
    for ann in coco.anns.values():
        if ann['iscrowd'] or rng.random() < 0.15:
            continue
        x, y, w, h = (np.array(ann['bbox']) + rng.uniform(-5, 5, 4)).tolist()
        category = ann['category_id'] if rng.random() > 0.25 else int(rng.choice([3, 7, 12]))
        results.append({'image_id': ann['image_id'], 'category_id': category, 'bbox': [x, y, w, h],
                        'score': float(rng.uniform(0.05, 1))})
    return results


def test_category_ap_is_cocoeval_on_that_category_alone(coco_gt):
    from detection.evaluation import coco_metrics
    results = noisy_results(coco_gt, np.random.default_rng(0))
    metrics = coco_metrics(coco_gt, results, ('bbox',))
    per_class = metrics['bbox_per_class']
    assert len(per_class) == 4 and per_class[3] is None  # 'star' has no object
    for k, category in enumerate([3, 7, 12]):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), 'bbox')
        evaluator.params.catIds = [category]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert 5 < per_class[k] < 100
        assert per_class[k] == pytest.approx(100 * evaluator.stats[0], abs=1e-9)
    # Nothing detected: 0 where there are objects, still null where there are none.
    assert coco_metrics(coco_gt, [], ('bbox',))['bbox_per_class'] == [0.0, 0.0, 0.0, None]


def test_detection_record_and_table_name_every_category(coco_gt):
    from detection.category_ap import per_class_record, per_class_table
    from detection.evaluation import coco_metrics
    metrics = coco_metrics(coco_gt, noisy_results(coco_gt, np.random.default_rng(1)), ('bbox',))
    names = ['square', 'disk', 'triangle', 'star']
    record = per_class_record(metrics, names)
    assert list(record) == ['bbox_ap_per_class'] and list(record['bbox_ap_per_class']) == names
    text = json.dumps(record, allow_nan=False)  # raises on NaN
    assert '"star": null' in text
    table = per_class_table(metrics, names).splitlines()
    assert 'bbox_AP' in table[1] and table[-1].split()[1:] == ['star', '-']
    assert table[2].split()[:3] == ['0', 'square', f'{metrics["bbox_per_class"][0]:.1f}']


def test_segmentation_classes_and_record():
    from segmentation.classes import class_names, per_class_record, per_class_table
    from segmentation.metrics import SegmentationMetric
    from data.dataset_classes import ADE20K_CLASSES
    seg_cfg = str(ROOT / 'configs' / 'segmentation' / 'upernet_focalnet_tiny_srf_160k.yaml')
    assert class_names(load_config(seg_cfg)) == list(ADE20K_CLASSES) and ADE20K_CLASSES[:3] == ('wall', 'building', 'sky')
    assert class_names(load_config(seg_cfg, ['MODEL.NUM_CLASSES', '3'])) == ['class 0', 'class 1', 'class 2']
    demo = load_config(str(ROOT / 'configs' / 'demo' / 'upernet_shapes.yaml'))
    names = class_names(demo)
    assert names == ['photo', 'disk', 'square', 'triangle']
    with pytest.raises(UserError, match='SEG.CLASS_NAMES names 4 classes; MODEL.NUM_CLASSES is 5'):
        class_names(load_config(str(ROOT / 'configs' / 'demo' / 'upernet_shapes.yaml'), ['MODEL.NUM_CLASSES', '5']))
    metric = SegmentationMetric(4)
    label = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 0]])      # class 3 in neither
    metric.update(pred, label)
    result = metric.compute()
    record = per_class_record(result, names)
    assert record['iou_per_class'] == {'photo': 50.0, 'disk': pytest.approx(100 * 2 / 3),
                                       'square': 50.0, 'triangle': None}
    assert record['acc_per_class']['triangle'] is None and record['acc_per_class']['disk'] == 100.0
    assert 'NaN' not in json.dumps(record) and 'null' in json.dumps(record)
    assert per_class_table(result, names).splitlines()[-1].split() == ['3', 'triangle', '-', '-']


def test_inputs_are_regular_files(tmp_path):
    from tools.dense_predict import collect_inputs, output_names
    (tmp_path / 'a').mkdir()
    for name in ('a/x.jpg', 'a/y.png', 'b.jpg'):
        Image.new('RGB', (8, 8)).save(tmp_path / name)
    os.mkfifo(tmp_path / 'a' / 'pipe.jpg')
    # A FIFO in a folder or matched by a pattern is passed over (never opened); named, it is refused.
    assert sorted(p.name for p in collect_inputs([str(tmp_path / 'a')])) == ['x.jpg', 'y.png']
    assert [p.name for p in collect_inputs([str(tmp_path / 'a' / '*.jpg')])] == ['x.jpg']
    with pytest.raises(UserError, match='a FIFO .*not a regular file'):
        collect_inputs([str(tmp_path / 'a' / 'pipe.jpg')])
    with pytest.raises(UserError, match='not found'):
        collect_inputs([str(tmp_path / 'missing.jpg')])
    assert output_names([Path('a/x.jpg'), Path('b/x.jpg'), Path('c/y.jpg')]) == ['x', 'x_2', 'y']


def test_palette_png_holds_the_classes_in_ade20k_colours(tmp_path):
    from segmentation.classes import palette
    from tools.dense_predict import palette_png
    from data.dataset_classes import ADE20K_PALETTE
    pred = torch.randint(0, 150, (20, 30))
    palette_png(pred, palette(150)).save(tmp_path / 'p.png')
    png = Image.open(tmp_path / 'p.png')
    assert png.mode == 'P' and np.array_equal(np.asarray(png), pred.numpy())
    assert np.array_equal(np.asarray(png.convert('RGB')), np.array(ADE20K_PALETTE, dtype=np.uint8)[pred.numpy()])
    assert len(palette(160)) == 160 and np.array_equal(palette(160)[:150], np.array(ADE20K_PALETTE))


def test_drawn_detections_follow_the_boxes_and_masks():
    from tools.dense_predict import OBJECT_COLOURS, draw_detections
    image = torch.full((3, 60, 80), 128, dtype=torch.uint8)
    mask = torch.zeros(2, 1, 60, 80)
    mask[0, 0, 10:30, 10:40] = 0.9
    output = {'boxes': torch.tensor([[10., 10, 40, 30], [50, 20, 70, 50]]), 'labels': torch.tensor([1, 2]),
              'scores': torch.tensor([0.9, 0.1]), 'masks': mask}
    drawn = np.asarray(draw_detections(image, output, ['disk', 'square'], OBJECT_COLOURS, 0.3)).astype(int)
    assert (drawn[20, 25] != 128).any()            # inside the kept detection's mask: coloured
    assert (drawn[35, 60] == 128).all()            # inside the low-scoring one's box: untouched
    assert tuple(drawn[30, 25]) == tuple(OBJECT_COLOURS[0])  # the kept box's bottom edge, in class 1's colour
