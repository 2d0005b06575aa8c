"""Every entry point's flags with bad values: one line naming the value, exit status 2, no traceback,
no hang, nothing computed first. The table is walked in one child process per entry point (under a
timeout, so a case that blocks fails the test instead of hanging it); each case calls the entry
point's ``main(argv)`` as the command line does."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLS_CFG = 'configs/focalnet_tiny_srf.yaml'
DET_CFG = 'configs/detection/mask_rcnn_focalnet_tiny_srf_1x.yaml'
SEG_CFG = 'configs/segmentation/upernet_focalnet_tiny_srf_160k.yaml'
SMALL = ['MODEL.FOCAL.EMBED_DIM', '16', 'MODEL.FOCAL.DEPTHS', '[1, 1, 1, 1]']

# Each case: (argv, text the last line of stderr must contain). {tmp} is a folder holding: fifo (a
# FIFO), folder/, binary.bin (bytes that are not text), photo.jpg (a real photograph), file.txt.
# argparse's own errors (a word where a number is expected) print a usage line before theirs.
CASES = {
    'main': ('main', [
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--batch-size', '0'], 'DATA.BATCH_SIZE must be an integer >= 1; got 0'),
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--batch-size', '-3'], 'DATA.BATCH_SIZE must be an integer >= 1; got -3'),
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--batch-size', 'x'], "argument --batch-size: invalid int value: 'x'"),
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--accumulation-steps', '-1'], 'TRAIN.ACCUMULATION_STEPS must be'),
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--opts', 'DATA.IMG_SIZE', '31'], 'DATA.IMG_SIZE must be an integer from 32 to 4096'),
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--opts', 'DATA.IMG_SIZE', '1'], 'got 1'),
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--opts', 'DATA.IMG_SIZE', '100000'], 'got 100000'),
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--opts', 'TRAIN.BASE_LR', 'nan'], "TRAIN.BASE_LR must be a number >= 0; got 'nan'"),
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--opts', 'TRAIN.BASE_LR', '.nan'], "TRAIN.BASE_LR must be a number >= 0; got '.nan'"),
        (['--cfg', '{tmp}/nan_lr.yaml', '--dataset', 'fake'], 'TRAIN.BASE_LR must be a number >= 0; got nan'),
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--opts', 'TRAIN.WEIGHT_DECAY', 'inf'], 'TRAIN.WEIGHT_DECAY must be'),
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--opts', 'MODEL.DROP_PATH_RATE', '1.5'], 'MODEL.DROP_PATH_RATE must be a number in [0, 1)'),
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--opts', 'AUG.MIXUP_PROB', 'nan'], 'AUG.MIXUP_PROB must be'),
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--opts', 'SEED', '-1'], 'SEED must be'),
        (['--cfg', '{tmp}/fifo'], 'is not a regular file'),
        (['--cfg', '{tmp}/folder'], 'is a folder'),
        (['--cfg', '{tmp}/binary.bin'], 'not a YAML text file'),
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--eval', '--resume', '{tmp}/fifo', '--output', '{tmp}/out'],
         '{tmp}/fifo is a FIFO (named pipe), not a checkpoint file'),
        (['--cfg', CLS_CFG, '--dataset', 'fake', '--output', '{tmp}/file.txt'], 'is a file, not a folder'),
    ]),
    'detection': ('detection.train', [
        (['--cfg', DET_CFG, '--batch-size', '0'], 'DATA.BATCH_SIZE must be an integer >= 1; got 0'),
        (['--cfg', DET_CFG, '--opts', 'DETECTION.MAX_SIZE', '100000'], 'DETECTION.MAX_SIZE must be an integer from 32 to 8192'),
        (['--cfg', DET_CFG, '--opts', 'DETECTION.MIN_SIZE_TEST', '8'], 'DETECTION.MIN_SIZE_TEST must be'),
        (['--cfg', DET_CFG, '--opts', 'DETECTION.MIN_SIZE_TRAIN', '[800, 100000]'], 'DETECTION.MIN_SIZE_TRAIN must be'),
        (['--cfg', DET_CFG, '--opts', 'DETECTION.SCORE_THRESH', 'nan'], "DETECTION.SCORE_THRESH must be a number in [0, 1]; got 'nan'"),
        (['--cfg', '{tmp}/nan_det.yaml'], 'DETECTION.SCORE_THRESH must be a number in [0, 1]; got nan'),
        (['--cfg', DET_CFG, '--opts', 'DETECTION.HFLIP', '2'], 'DETECTION.HFLIP must be'),
        (['--cfg', DET_CFG, '--opts', 'DETECTION.WARMUP_ITERS', '-1'], 'DETECTION.WARMUP_ITERS must be'),
        (['--cfg', DET_CFG, '--opts', 'DETECTION.CROP_SIZE', '[384]'], 'DETECTION.CROP_SIZE must be a list of 2 values'),
        (['--cfg', DET_CFG, '--data-path', '{tmp}/fifo', '--output', '{tmp}/out', '--opts', *SMALL],
         'COCO root {tmp}/fifo is a FIFO (named pipe), not a folder'),
        (['--cfg', DET_CFG, '--data-path', '{tmp}/coco', '--output', '{tmp}/out', '--opts', *SMALL],
         'instances_val2017.json: the annotation file is a FIFO (named pipe)'),
    ]),
    'segmentation': ('segmentation.train', [
        (['--cfg', SEG_CFG, '--batch-size', '0'], 'DATA.BATCH_SIZE must be an integer >= 1; got 0'),
        (['--cfg', SEG_CFG, '--opts', 'SEG.AUG.CROP_SIZE', '16'], 'SEG.AUG.CROP_SIZE must be an integer from 32 to 8192'),
        (['--cfg', SEG_CFG, '--opts', 'SEG.TEST.SCALE', '[100000, 512]'], 'SEG.TEST.SCALE must be'),
        (['--cfg', SEG_CFG, '--opts', 'SEG.AUG.FLIP', 'nan'], "SEG.AUG.FLIP must be a number in [0, 1]; got 'nan'"),
        (['--cfg', '{tmp}/nan_seg.yaml'], 'SEG.AUG.FLIP must be a number in [0, 1]; got nan'),
        (['--cfg', SEG_CFG, '--opts', 'SEG.TEST.RATIOS', '[0]'], 'SEG.TEST.RATIOS must be'),
        (['--cfg', SEG_CFG, '--opts', 'SEG.AUG.CAT_MAX_RATIO', '0'], 'SEG.AUG.CAT_MAX_RATIO must be a number in (0, 1]'),
        (['--cfg', SEG_CFG, '--opts', 'SEG.HEAD.DROPOUT', '-0.1'], 'SEG.HEAD.DROPOUT must be'),
        (['--cfg', SEG_CFG, '--opts', 'SEG.TRAIN.ITERS', '0'], 'SEG.TRAIN.ITERS must be positive'),
        (['--cfg', SEG_CFG, '--data-path', '{tmp}/fifo', '--output', '{tmp}/out'], 'data folder not found'),
        (['--cfg', SEG_CFG, '--data-path', '{tmp}/ade', '--output', '{tmp}/out', '--opts', *SMALL],
         'ADE_validation_00000000.png (a FIFO (named pipe))'),
    ]),
    'predict': ('tools.predict', [
        (['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--img-size', '1'], '--img-size must be an integer from 32 to 4096'),
        (['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--img-size', '99999'], '--img-size must be'),
        (['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--topk', '0'], '--topk must be positive; got 0'),
        (['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--batch-size', '0'], '--batch-size must be positive; got 0'),
        (['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--workers', '-1'], '--workers must be 0 or more'),
        (['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--labels', '{tmp}/binary.bin', '--opts', *SMALL],
         '--labels {tmp}/binary.bin is not a text file of class names'),
        (['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--labels', '{tmp}/fifo', '--opts', *SMALL],
         '--labels {tmp}/fifo is a FIFO (named pipe), not a file of class names'),
        (['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--json', '{tmp}/folder'], '--json {tmp}/folder is a folder'),
        (['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--csv', '{tmp}/folder'], '--csv {tmp}/folder is a folder'),
        (['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--json', '{tmp}/nowhere/p.json'], 'output folder not found'),
        (['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--json', '/proc/p.json'], 'cannot write in the folder /proc'),
        (['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--json', '{tmp}/fifo'], 'is a FIFO (named pipe), not a regular file'),
        (['{tmp}/fifo', '--model', 'focalnet_tiny_srf'], '{tmp}/fifo is a FIFO (named pipe), not an image file'),
        (['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--device', 'gpu'], "bad --device 'gpu'"),
        (['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--topk', 'five'], "argument --topk: invalid int value: 'five'"),
    ]),
    'export': ('tools.export', [
        (['--model', 'focalnet_tiny_srf', '--output', '{tmp}/m.onnx', '--opset', '3'], '--opset must be from 18 to 25'),
        (['--model', 'focalnet_tiny_srf', '--output', '{tmp}/m.onnx', '--opset', '99'], '--opset must be from 18 to 25'),
        (['--model', 'focalnet_tiny_srf', '--output', '{tmp}/m.pt', '--format', 'torchscript', '--opset', '18'], '--opset is for --format onnx'),
        (['--model', 'focalnet_tiny_srf', '--output', '{tmp}/m.onnx', '--tolerance', 'nan'], '--tolerance must be a finite number >= 0'),
        (['--model', 'focalnet_tiny_srf', '--output', '{tmp}/m.onnx', '--tolerance', '-1'], '--tolerance must be'),
        (['--model', 'focalnet_tiny_srf', '--output', '{tmp}/m.onnx', '--tolerance', 'inf'], '--tolerance must be'),
        (['--model', 'focalnet_tiny_srf', '--output', '{tmp}/m.onnx', '--batch-size', '0'], '--batch-size must be from 1 to 1024'),
        (['--model', 'focalnet_tiny_srf', '--output', '{tmp}/m.onnx', '--img-size', '1'], '--img-size must be an integer from 32'),
        (['--model', 'focalnet_tiny_srf', '--output', '{tmp}/m.onnx', '--img-size', '224', '224', '3'], '--img-size takes H [W]'),
        (['--model', 'focalnet_tiny_srf', '--output', '{tmp}/folder'], '--output {tmp}/folder is a folder'),
        (['--model', 'focalnet_tiny_srf', '--output', '/proc/m.onnx'], 'cannot write in the folder /proc'),
        (['--model', 'focalnet_tiny_srf', '--output', '{tmp}/fifo'], 'is a FIFO (named pipe), not a regular file'),
        (['--model', 'focalnet_tiny_srf', '--output', '{tmp}/m.onnx', '--checkpoint', '{tmp}/fifo'],
         '{tmp}/fifo is a FIFO (named pipe), not a checkpoint file'),
    ]),
    'visualize': ('tools.visualize', [
        (['--cfg', CLS_CFG, '--image', '{tmp}/photo.jpg', '--output', '{tmp}/figs', '--channels', '0'], '--channels must be at least 1'),
        (['--cfg', CLS_CFG, '--image', '{tmp}/photo.jpg', '--output', '{tmp}/figs', '--img-size', '8'], '--img-size must be an integer from 32'),
        (['--cfg', CLS_CFG, '--image', '{tmp}/photo.jpg', '--output', '{tmp}/file.txt'], '--output {tmp}/file.txt is a file; give a folder'),
        (['--cfg', CLS_CFG, '--image', '{tmp}/photo.jpg', '--output', '/proc/figs'], '--output /proc/figs: cannot create the folder'),
        (['--cfg', CLS_CFG, '--image', '{tmp}/photo.jpg', '--output', '{tmp}/fifo'], 'is a FIFO (named pipe); give a folder'),
        (['--cfg', CLS_CFG, '--image', '{tmp}/fifo', '--output', '{tmp}/figs', '--opts', *SMALL], '--image {tmp}/fifo is a FIFO (named pipe), not an image file'),
        (['--cfg', CLS_CFG, '--image', '{tmp}/photo.jpg', '--output', '{tmp}/figs', '--cmap', 'nope'], "unknown colormap 'nope'"),
        (['--cfg', CLS_CFG, '--image', '{tmp}/photo.jpg', '--output', '{tmp}/figs', '--device', 'gpu'], "bad --device 'gpu'"),
        (['--cfg', '{tmp}/fifo', '--image', '{tmp}/photo.jpg', '--output', '{tmp}/figs'], 'is not a regular file'),
    ]),
    'demo': ('demo.app', [
        (['--port', '0'], '--port 0 is not a port number'),
        (['--port', '70000'], '--port 70000 is not a port number'),
        (['--device', 'gpu'], "bad --device 'gpu'"),
        (['--checkpoint', '{tmp}/fifo'], '{tmp}/fifo is a FIFO (named pipe), not a checkpoint file'),
        (['--checkpoint', '{tmp}/binary.bin'], '{tmp}/binary.bin: not a checkpoint this page reads'),
        (['--checkpoint', '{tmp}/folder'], 'not a checkpoint this page reads'),
        (['--cfg', '{tmp}/fifo'], '{tmp}/fifo is a FIFO (named pipe), not a config file'),
    ]),
    'benchmark': ('tools.benchmark', [
        (['--compare', 'timm', '--batch-size', '0'], '--batch-size must be at least 1, got 0'),
        (['--compare', 'timm', '--img-size', '1'], '--img-size must be from 32 to 4096, got 1'),
        (['--compare', 'timm', '--iters', '0'], '--iters must be at least 1'),
        (['--compare', 'timm', '--warmup', '-1'], '--warmup must be 0 or more'),
        (['--compare', 'timm', '--threads', '0'], '--threads at least 1'),
        (['--compare', 'timm', '--drop-path', 'nan'], '--drop-path must be in [0, 1), got nan'),
        (['--compare', 'timm', '--json', '{tmp}/folder'], '--json {tmp}/folder is a folder'),
    ]),
}

# Runs in the child: every case of one entry point, writing one JSON line per case.
DRIVER = r'''
import contextlib, importlib, io, json, logging, sys
sys.path.insert(0, sys.argv[1])
logging.disable(logging.WARNING)  # the entry points' own logs: only stderr's error line is judged
module = importlib.import_module(sys.argv[2])
cases = json.loads(sys.stdin.read())
with open(sys.argv[3], 'w') as out:
    for argv in cases:
        print('case', argv, file=sys.__stdout__, flush=True)  # the last one printed is the one that hung
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = module.main(argv)
            except SystemExit as e:
                code = e.code
            except BaseException as e:
                import traceback
                code = 'raised'
                err.write(traceback.format_exc())
        out.write(json.dumps({'argv': argv, 'code': code, 'stderr': err.getvalue()}) + '\n')
        out.flush()
'''


@pytest.fixture(scope='module')
def hostile(tmp_path_factory) -> Path:
    from hostile_data import make_ade_pairs, valid_coco, write_coco
    from sklearn.datasets import load_sample_images
    tmp = tmp_path_factory.mktemp('flags')
    os.mkfifo(tmp / 'fifo')
    (tmp / 'folder').mkdir()
    (tmp / 'binary.bin').write_bytes(bytes(range(256)) * 4)
    (tmp / 'file.txt').write_text('a file\n')
    # NaN reaches a config from YAML (.nan); --opts reads 'nan' as a word.
    for name, base, key in (('nan_lr', CLS_CFG, 'TRAIN:\n  BASE_LR: .nan'),
                            ('nan_det', DET_CFG, 'DETECTION:\n  SCORE_THRESH: .nan'),
                            ('nan_seg', SEG_CFG, 'SEG:\n  AUG:\n    FLIP: .nan')):
        (tmp / f'{name}.yaml').write_text(f'BASE: {ROOT / base}\n{key}\n')
    (tmp / 'photo.jpg').write_bytes(Path(load_sample_images().filenames[0]).read_bytes())
    write_coco(tmp / 'coco', 'train2017', valid_coco())
    write_coco(tmp / 'coco', 'val2017', valid_coco())
    (tmp / 'coco' / 'annotations' / 'instances_val2017.json').unlink()
    os.mkfifo(tmp / 'coco' / 'annotations' / 'instances_val2017.json')
    ade = make_ade_pairs(tmp / 'ade')
    label = ade / 'annotations' / 'validation' / 'ADE_validation_00000000.png'
    label.unlink()
    os.mkfifo(label)
    return tmp


def _fill(value: str, tmp: Path) -> str:
    return value.replace('{tmp}', str(tmp))


@pytest.mark.parametrize('entry', sorted(CASES))
def test_bad_flag_values_give_one_line_and_status_2(entry, hostile, tmp_path):
    module, cases = CASES[entry]
    argvs = [[_fill(a, hostile) for a in argv] for argv, _ in cases]
    results_path = tmp_path / 'results.jsonl'
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    try:
        proc = subprocess.run([sys.executable, '-c', DRIVER, str(ROOT), module, str(results_path)],
                              input=json.dumps(argvs), cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=240)
    except subprocess.TimeoutExpired as e:
        last = [line for line in (e.stdout or b'').decode().splitlines() if line.startswith('case ')][-1:]
        pytest.fail(f'{entry}: a case did not finish in 240 s (a hang?): {last}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in results_path.read_text().splitlines()]
    assert len(results) == len(cases)
    failures = []
    for result, (_, expected) in zip(results, cases):
        lines = [line for line in result['stderr'].splitlines() if line.strip()]
        argparse_usage = len(lines) > 1 and lines[0].startswith('usage:')  # argparse's own format
        ok = (result['code'] == 2 and 'Traceback' not in result['stderr'] and (len(lines) == 1 or argparse_usage)
              and _fill(expected, hostile) in lines[-1])
        if not ok:
            failures.append(f'{" ".join(result["argv"])}\n  -> exit {result["code"]}: {result["stderr"][-800:]}')
    assert not failures, '\n'.join(failures)


# ---- outputs are checked before any work --------------------------------------------------------------

@pytest.mark.parametrize('tool, argv, expected', [
    # The checkpoint does not exist either: the output is named first, before any weight is read.
    ('predict', ['{tmp}/photo.jpg', '--model', 'focalnet_tiny_srf', '--checkpoint', '{tmp}/missing.pth',
                 '--json', '{tmp}/folder'], '--json {tmp}/folder is a folder'),
    ('export', ['--model', 'focalnet_tiny_srf', '--checkpoint', '{tmp}/missing.pth', '--output', '{tmp}/folder'],
     '--output {tmp}/folder is a folder'),
    ('visualize', ['--cfg', CLS_CFG, '--checkpoint', '{tmp}/missing.pth', '--image', '{tmp}/photo.jpg',
                   '--output', '{tmp}/file.txt'], '--output {tmp}/file.txt is a file; give a folder'),
])
def test_outputs_are_checked_before_the_model_is_loaded(tool, argv, expected, hostile, capsys):
    import importlib
    main = importlib.import_module(f'tools.{tool}').main
    assert main([_fill(a, hostile) for a in argv]) == 2
    assert _fill(expected, hostile) in capsys.readouterr().err


def test_predict_passes_over_fifos_its_folders_and_patterns_find(hostile, tmp_path, capsys, caplog):
    import logging
    from tools.predict import collect_images, main
    shots = tmp_path / 'shots'
    shots.mkdir()
    (shots / 'a.jpg').write_bytes((hostile / 'photo.jpg').read_bytes())
    os.mkfifo(shots / 'b.jpg')
    with caplog.at_level(logging.WARNING, logger='focalnet'):
        by_folder, _ = collect_images([str(shots)])
        by_glob, _ = collect_images([str(shots / '*.jpg')])
    assert by_folder == by_glob == [shots / 'a.jpg']
    assert caplog.text.count('b.jpg (a FIFO (named pipe))') == 2
    # The whole command, under a timeout in a child process: it predicts a.jpg and ends.
    proc = subprocess.run([sys.executable, 'tools/predict.py', str(shots / '*.jpg'), '--model', 'focalnet_tiny_srf',
                           '--workers', '0', '--no-progress', '--opts', *SMALL], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0 and str(shots / 'a.jpg') in proc.stdout, proc.stderr[-2000:]


# ---- metrics.jsonl ------------------------------------------------------------------------------------

def _strict_loads(line: str):
    def refuse(name):
        raise ValueError(f'{name} is not JSON')
    return json.loads(line, parse_constant=refuse)


def test_an_all_ignored_validation_set_records_null_with_the_reason(tmp_path, caplog):
    import logging
    import torch
    from engine.metrics import append_metrics
    from segmentation.metrics import SegmentationMetric
    metric = SegmentationMetric(num_classes=4)
    labels = torch.full((2, 8, 8), 255, dtype=torch.uint8)
    metric.update(torch.zeros(2, 8, 8, dtype=torch.long), labels)
    with caplog.at_level(logging.WARNING, logger='focalnet'):
        result = metric.compute()
        path = tmp_path / 'metrics.jsonl'
        append_metrics(str(path), {'mode': 'eval', 'miou': result['miou'], 'macc': result['macc'],
                                   'aacc': result['aacc'], 'iou': result['iou'], 'train_loss': float('inf')})
    record = _strict_loads(path.read_text())
    assert record == {'mode': 'eval', 'miou': None, 'macc': None, 'aacc': None, 'iou': [None] * 4,
                      'train_loss': None}
    assert 'no pixel of the validation labels counts' in caplog.text
    assert 'metrics.jsonl: miou, macc, aacc, train_loss undefined (NaN or infinite); recorded as null' in caplog.text


# ---- the demo never shows what a file holds -----------------------------------------------------------

def test_the_demo_names_a_path_and_the_kind_of_problem_only(hostile, tmp_path):
    from demo.app import Demo, architectures
    from errors import UserError
    secret = tmp_path / 'secret.txt'
    secret.write_text('root:x:0:0:SECRET-CONTENT\n')
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(b'PK\x03\x04SECRET-CONTENT')
    demo = Demo(architectures())
    cases = {
        str(secret): f'{secret}: not a checkpoint this page reads',
        str(truncated): f'{truncated}: not a checkpoint this page reads',
        '/etc/passwd': '/etc/passwd: not a checkpoint this page reads',
        str(hostile / 'fifo'): f'{hostile / "fifo"} is a FIFO (named pipe), not a checkpoint file',
        str(tmp_path / 'nothing.pth'): f'checkpoint not found: {tmp_path / "nothing.pth"}',
        '/dev/zero': '/dev/zero is a character device, not a checkpoint file',
    }
    # A FocalNet checkpoint of another architecture: the misfit is told in the architecture's terms.
    import torch
    from config import load_config
    from models import build_model
    lrf = tmp_path / 'lrf.pth'
    torch.save({'model': build_model(load_config(str(ROOT / 'configs' / 'focalnet_tiny_lrf.yaml'))).state_dict()}, lrf)
    cases[str(lrf)] = (f'{lrf}: its weights do not fit focalnet_tiny_srf (24 of another shape: '
                       f'layers.0.blocks.0.modulation.f.weight, layers.0.blocks.0.modulation.f.bias, '
                       f'layers.0.blocks.1.modulation.f.weight ...; 12 entries it has no parameter for)')
    for path, expected in cases.items():
        with pytest.raises(UserError) as raised:
            demo.load('focalnet_tiny_srf', path)
        message = str(raised.value)
        assert message.startswith(expected) and 'SECRET' not in message and 'root:x' not in message
