"""Malformed COCO and ADE20K-layout data sets are named in one line before any work; degenerate
objects are dropped and counted; FIFOs and devices are never opened (tests/hostile_data.py makes the
cases)."""
import copy
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from hostile_data import (ADE_CASES, COCO_CASES, DEGENERATE, degenerate_object, make_ade_pairs, valid_coco,
                          write_coco)

ROOT = Path(__file__).resolve().parents[1]
DET_CFG = ROOT / 'configs' / 'detection' / 'mask_rcnn_focalnet_tiny_srf_1x.yaml'
SEG_CFG = ROOT / 'configs' / 'segmentation' / 'upernet_focalnet_tiny_srf_160k.yaml'


@contextmanager
def fifo(path: Path, patience: float = 20.0):
    """A FIFO at ``path``; should anything open it for reading, a writer opens it after ``patience``
    seconds so the test fails instead of hanging. Yields a dict whose 'opened' says whether that
    happened."""
    os.mkfifo(path)
    state = {'opened': False, 'done': False}

    def rescue():
        deadline = time.monotonic() + patience
        while not state['done']:
            if time.monotonic() > deadline:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # fails while nobody reads
                    state['opened'] = True
                    os.close(fd)
                except OSError:
                    pass
            time.sleep(0.05)

    thread = threading.Thread(target=rescue, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state['done'] = True
        thread.join()


# ---- COCO instances files -----------------------------------------------------------------------------

def test_a_valid_file_passes_with_defaults_filled_in(tmp_path):
    from detection.annotations import load_coco
    doc = valid_coco()
    for ann in doc['annotations']:
        del ann['area'], ann['iscrowd']
    checked = load_coco(str(write_coco(tmp_path, 'val', doc)))
    assert checked.degenerate == {}
    # COCOeval reads "area" and "iscrowd" of every object: they are filled in, area from the mask.
    assert [a['iscrowd'] for a in checked.dataset['annotations']] == [0, 0, 0]
    assert [a['area'] for a in checked.dataset['annotations']] == [400.0, 400.0, 400.0]


@pytest.mark.parametrize('case', sorted(COCO_CASES))
def test_each_structural_problem_is_one_line_naming_file_id_and_key(case, tmp_path):
    from detection.annotations import AnnotationError, load_coco
    change, expected = COCO_CASES[case]
    path = write_coco(tmp_path, 'val', change(valid_coco()))
    with pytest.raises(AnnotationError) as raised:
        load_coco(str(path))
    message = str(raised.value)
    assert message.startswith(f'{path}: ') and expected in message and '\n' not in message, message


def test_every_problem_of_a_file_is_listed(tmp_path, caplog):
    from detection.annotations import AnnotationError, load_coco
    doc = valid_coco()
    doc['images'][0]['height'] = '48'
    doc['annotations'][0]['category_id'] = 99
    doc['annotations'][1]['segmentation']['size'] = [1, 1]
    doc['annotations'][2]['bbox'] = ['a', 1, 2, 3]
    with caplog.at_level(logging.ERROR, logger='focalnet'), pytest.raises(AnnotationError) as raised:
        load_coco(str(write_coco(tmp_path, 'val', doc)))
    assert len(raised.value.problems) == 4
    assert str(raised.value).endswith('(and 3 more problem(s) in the file, listed in the log)')
    logged = caplog.text
    assert 'category_id" 99' in logged and '"size" [1, 1]' in logged and '"bbox" must be 4 numbers' in logged


@pytest.mark.parametrize('text,expected', [
    ('{"images": [', 'not valid JSON: Expecting value at line 1, column 13'),
    ('{"images": []}\n}', 'not valid JSON: Extra data at line 2, column 1'),
    ('', 'not valid JSON: Expecting value at line 1, column 1'),
])
def test_a_file_that_is_not_json_names_line_and_column(tmp_path, text, expected):
    from detection.annotations import load_coco
    from errors import UserError
    path = tmp_path / 'instances.json'
    path.write_text(text)
    with pytest.raises(UserError, match=expected):
        load_coco(str(path))
    path.write_bytes(b'\xff\xfe{}')
    with pytest.raises(UserError, match='not a JSON text file'):
        load_coco(str(path))


def test_annotation_file_that_is_a_fifo_or_folder_is_refused_without_opening(tmp_path):
    from detection.annotations import load_coco
    from errors import UserError
    with fifo(tmp_path / 'instances.json') as state:
        with pytest.raises(UserError, match=r'instances.json: the annotation file is a FIFO'):
            load_coco(str(tmp_path / 'instances.json'))
    assert not state['opened']
    (tmp_path / 'folder.json').mkdir()
    with pytest.raises(UserError, match='the annotation file is a folder'):
        load_coco(str(tmp_path / 'folder.json'))


@pytest.mark.parametrize('case', sorted(DEGENERATE))
def test_degenerate_objects_are_dropped_from_training_and_counted(case, tmp_path, caplog):
    from detection.data import read_coco
    changes, reason = DEGENERATE[case]
    doc = valid_coco()
    doc['annotations'].append(degenerate_object(doc, changes, 99))
    write_coco(tmp_path, 'train', copy.deepcopy(doc))
    with caplog.at_level(logging.WARNING, logger='focalnet'):
        train = read_coco(str(tmp_path), 'train', drop_degenerate=True)
    assert sorted(train.coco.anns) == [11, 12, 21]
    assert f'1 of 4 objects cover no usable area (1 {reason}); left out of the training targets' in caplog.text
    # The evaluation keeps it: COCOeval scores against the file as it is.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='focalnet'):
        val = read_coco(str(tmp_path), 'train')
    assert sorted(val.coco.anns) == [11, 12, 21, 99] and 'kept for the evaluation' in caplog.text


def test_degenerate_objects_of_several_kinds_are_counted_by_kind(tmp_path, caplog):
    from detection.data import read_coco
    doc = valid_coco()
    for i, (changes, _) in enumerate(DEGENERATE.values()):
        doc['annotations'].append(degenerate_object(doc, changes, 100 + i))
    write_coco(tmp_path, 'train', doc)
    with caplog.at_level(logging.WARNING, logger='focalnet'):
        read_coco(str(tmp_path), 'train', drop_degenerate=True)
    n = len(DEGENERATE)
    assert f'{n} of {n + 3} objects cover no usable area (' in caplog.text
    for count in ('3 box under one pixel wide or high', '2 box outside its image', '3 mask of area 0'):
        assert count in caplog.text


def _detection_args(root, out, *opts):
    return ['--cfg', str(DET_CFG), '--data-path', str(root), '--output', str(out), '--opts',
            'MODEL.FOCAL.EMBED_DIM', '16', 'MODEL.FOCAL.DEPTHS', '[1, 1, 1, 1]', 'DATA.NUM_WORKERS', '0',
            'DATA.BATCH_SIZE', '1', *opts]


@pytest.mark.parametrize('split', ['train2017', 'val2017'])
@pytest.mark.parametrize('case', ['a JSON list', 'no categories', 'bbox of strings', 'polygon of 2 points',
                                  'empty segmentation', 'no bbox', 'RLE of another size', 'RLE negative counts',
                                  'unknown category', 'image id a string', 'image without height',
                                  'duplicate image id', 'duplicate annotation id', 'unknown image'])
def test_detection_training_stops_before_any_work(case, split, tmp_path, capsys):
    """The cases the detection command met as tracebacks (or, for duplicate image ids, as a silently
    wrong training set): one line and exit status 2, before the model is built."""
    from detection.train import main
    change, expected = COCO_CASES[case]
    for s in ('train2017', 'val2017'):
        write_coco(tmp_path / 'coco', s, change(valid_coco()) if s == split else valid_coco())
    assert main(_detection_args(tmp_path / 'coco', tmp_path / 'out')) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: {tmp_path / "coco" / "annotations" / f"instances_{split}.json"}: ')
    assert expected in err and '\n' not in err, err


def test_an_empty_validation_split_is_an_error_not_a_score_of_zero(tmp_path, capsys):
    from detection.train import main
    write_coco(tmp_path / 'coco', 'train2017', valid_coco())
    write_coco(tmp_path / 'coco', 'val2017', {'images': [], 'annotations': [], 'categories': valid_coco()['categories']})
    for extra in ([], ['--eval', '--resume', str(tmp_path / 'missing.pth')]):
        assert main(_detection_args(tmp_path / 'coco', tmp_path / 'out') + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith('instances_val2017.json lists no images: the val2017 split is empty'), err
    assert not (tmp_path / 'out' / 'metrics.jsonl').exists()


def test_a_fifo_among_the_detection_images_is_named_or_skipped(tmp_path):
    from config import load_config
    from data.robust import CorruptImageError
    from detection.data import build_detection_loaders
    root = tmp_path / 'coco'
    for split in ('train2017', 'val2017'):
        write_coco(root, split, valid_coco())
    (root / 'train2017' / 'a.jpg').unlink()
    with fifo(root / 'train2017' / 'a.jpg') as state:
        opts = ['MODEL.FOCAL.EMBED_DIM', '16', 'MODEL.FOCAL.DEPTHS', '[1, 1, 1, 1]', 'DATA.NUM_WORKERS', '0',
                'DATA.BATCH_SIZE', '1', 'DATA.DATA_PATH', str(root), 'DETECTION.FILTER_EMPTY', 'False']
        loaders = build_detection_loaders(load_config(str(DET_CFG), opts))
        with pytest.raises(CorruptImageError, match=r'a.jpg: a FIFO \(named pipe\), not a regular file'):
            list(loaders.train)
        skipping = build_detection_loaders(load_config(str(DET_CFG), opts + ['DATA.SKIP_CORRUPT', 'True']))
        assert len(list(skipping.train)) == 2  # the refill takes the other image's place
        assert list(skipping.train.skipped) == [str(root / 'train2017' / 'a.jpg')]
    assert not state['opened']


# ---- ADE20K layout ----------------------------------------------------------------------------------

@pytest.mark.parametrize('case', sorted(ADE_CASES))
def test_each_bad_ade_pair_is_named_before_any_work(case, tmp_path):
    from errors import UserError
    from segmentation.data import ADE20K
    root = make_ade_pairs(tmp_path / 'ade')
    change, expected = ADE_CASES[case]
    with fifo(tmp_path / 'unused') as state:
        change(root)
        t0 = time.monotonic()
        with pytest.raises(UserError) as raised:
            ADE20K(str(root), 'val')
    message = str(raised.value)
    assert expected in message and '\n' not in message and 'root:x' not in message, message
    assert not state['opened'] and time.monotonic() - t0 < 10


def test_bad_ade_pairs_are_left_out_and_counted_when_skipping(tmp_path, caplog):
    from segmentation.data import ADE20K
    root = make_ade_pairs(tmp_path / 'ade')
    ADE_CASES['label bomb'][0](root)
    Image.new('L', (41, 32)).save(root / 'annotations' / 'validation' / 'ADE_validation_00000002.png')
    with caplog.at_level(logging.WARNING, logger='focalnet'):
        val = ADE20K(str(root), 'val', skip_corrupt=True)
    assert len(val) == 2 and 'leaving out 2 of 4 image/label pair(s)' in caplog.text


def test_a_fifo_among_the_ade_images_is_passed_over(tmp_path, caplog):
    from segmentation.data import ADE20K
    root = make_ade_pairs(tmp_path / 'ade')
    with fifo(root / 'images' / 'training' / 'ADE_training_00000009.jpg') as state:
        with caplog.at_level(logging.WARNING, logger='focalnet'):
            train = ADE20K(str(root), 'train')
        assert len(train) == 4 and 'passing over 1 name(s)' in caplog.text and 'a FIFO' in caplog.text
        for i in range(len(train)):
            train[i]
    assert not state['opened']


@pytest.mark.parametrize('reader', ['image', 'label map'])
def test_the_pixel_bound_holds_when_pillows_check_is_switched_off(reader, tmp_path, monkeypatch):
    """Some libraries set Image.MAX_IMAGE_PIXELS = None; the header check still refuses a bomb."""
    from data.robust import CorruptImageError, open_image
    from hostile_data import png_header
    from segmentation.data import open_label
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', None)
    path = tmp_path / 'bomb.png'
    path.write_bytes(png_header(20000, 20000, mode=2 if reader == 'image' else 0))
    with pytest.raises(CorruptImageError, match=f'the {reader} is 20000x20000 = 400 million pixels, more than the 179 million'):
        (open_image if reader == 'image' else open_label)(str(path))


def test_an_evaluation_whose_labels_are_all_ignored_records_null(tmp_path, capsys):
    """Every validation pixel 0 (ignored under SEG.REDUCE_ZERO_LABEL): mIoU is undefined, and
    metrics.jsonl says null (strict JSON), with the reason in the log."""
    import json
    import numpy as np
    import torch
    from config import load_config
    from segmentation.train import main, make_model
    root = make_ade_pairs(tmp_path / 'ade', n=2)
    for label in (root / 'annotations' / 'validation').iterdir():
        Image.fromarray(np.zeros((32, 40), np.uint8), mode='L').save(label)
    opts = ['MODEL.FOCAL.EMBED_DIM', '16', 'MODEL.FOCAL.DEPTHS', '[1, 1, 1, 1]', 'MODEL.NUM_CLASSES', '4',
            'SEG.HEAD.CHANNELS', '32', 'SEG.HEAD.AUX_CHANNELS', '16', 'SEG.TEST.SCALE', '[64, 32]',
            'DATA.NUM_WORKERS', '0']
    weights = tmp_path / 'segmentor.pth'
    torch.save(make_model(load_config(str(SEG_CFG), opts), torch.device('cpu')).state_dict(), weights)
    out = tmp_path / 'out'
    assert main(['--cfg', str(SEG_CFG), '--data-path', str(root), '--output', str(out), '--eval',
                 '--resume', str(weights), '--opts', *opts]) == 0
    logged = capsys.readouterr().out
    [line] = next(out.rglob('metrics.jsonl')).read_text().splitlines()
    record = json.loads(line, parse_constant=lambda name: pytest.fail(f'{name} in metrics.jsonl'))
    assert record['miou'] is None and record['macc'] is None and record['aacc'] is None
    assert 'no pixel of the validation labels counts' in logged and 'recorded as null' in logged
