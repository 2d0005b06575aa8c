"""The training engine: schedules, optimizer groups, transforms, and main.py end to end on the CPU.

The end-to-end runs use scikit-learn's bundled handwritten digits (exported to an ImageFolder tree)
and the synthetic 'fake' data set.
"""
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import config as cfg
from data import ZipImageDataset, build_dataset, build_transform
from lr_scheduler import build_scheduler
from models import FocalNet
from optimizer import build_optimizer, param_groups

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / 'main.py')

# Two small stages: trains on 32 px digits in seconds per epoch.
TINY = ['MODEL.FOCAL.DEPTHS', '[2, 2]', 'MODEL.FOCAL.FOCAL_LEVELS', '[2, 2]',
        'MODEL.FOCAL.FOCAL_WINDOWS', '[3, 3]', 'MODEL.FOCAL.FOCAL_FACTORS', '[2, 2]',
        'DATA.IMG_SIZE', '32', 'DATA.NUM_WORKERS', '0']
SMOKE = TINY + ['MODEL.FOCAL.EMBED_DIM', '16', 'DATA.FAKE_SIZE', '64', 'MODEL.NUM_CLASSES', '10',
                'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '1', 'PRINT_FREQ', '2']
DIGITS_CFG = str(ROOT / 'configs' / 'demo' / 'digits.yaml')


def run_main(args, launcher=(), check=True, timeout=600):
    # One thread per process: the runs are small, and a busy machine would otherwise oversubscribe.
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    proc = subprocess.run([*launcher, MAIN, *args] if launcher else [sys.executable, MAIN, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'main.py exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------
# Schedules and optimizer groups, against a bare optimizer
# ---------------------------------------------------------------------------------------------------

def _bare_optimizer(lr):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(config, steps_per_epoch, scale=1.0):
    opt = _bare_optimizer(config.TRAIN.BASE_LR * scale)
    sched = build_scheduler(config, opt, steps_per_epoch, scale)
    out = []
    for t in range(config.TRAIN.EPOCHS * steps_per_epoch + 1):
        sched.step_update(t)
        out.append(opt.param_groups[0]['lr'])
    return out


def test_schedule_warms_up_linearly_then_follows_a_cosine():
    c = cfg.load_config(None, ['TRAIN.EPOCHS', '10', 'TRAIN.WARMUP_EPOCHS', '2'])
    steps, scale = 5, 2.0
    lrs = _lrs(c, steps, scale)
    base, warm, low = 5e-4 * scale, 5e-7 * scale, 5e-6 * scale
    w = 2 * steps
    assert lrs[0] == pytest.approx(warm)
    assert np.allclose(np.diff(lrs[:w + 1]), (base - warm) / w)  # a straight line up
    assert lrs[w] == pytest.approx(base)
    total = 10 * steps - w
    for t in (w, w + 7, w + total // 2, 10 * steps - 1):
        expected = low + 0.5 * (base - low) * (1 + math.cos(math.pi * (t - w) / total))
        assert lrs[t] == pytest.approx(expected, rel=1e-9)
    assert all(a >= b for a, b in zip(lrs[w:], lrs[w + 1:]))
    assert lrs[-1] == pytest.approx(low)


def test_linear_and_step_schedules():
    c = cfg.load_config(None, ['TRAIN.EPOCHS', '10', 'TRAIN.WARMUP_EPOCHS', '0',
                               'TRAIN.LR_SCHEDULER.NAME', 'linear'])
    lrs = _lrs(c, 4)
    assert np.allclose(np.diff(lrs[:40]), (5e-6 - 5e-4) / 40)
    c = cfg.load_config(None, ['TRAIN.EPOCHS', '10', 'TRAIN.WARMUP_EPOCHS', '0',
                               'TRAIN.LR_SCHEDULER.NAME', 'step', 'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '3'])
    lrs = _lrs(c, 4)
    assert lrs[11] == pytest.approx(5e-4) and lrs[12] == pytest.approx(5e-5)
    assert lrs[24] == pytest.approx(5e-6)


def test_no_weight_decay_on_norms_biases_and_layer_scales():
    model = FocalNet(embed_dim=16, depths=(1, 1), focal_levels=2, focal_windows=3, num_classes=5,
                     use_layerscale=True, use_postln=True)
    decay, no_decay = param_groups(model, 0.05)
    assert decay['weight_decay'] == 0.05 and no_decay['weight_decay'] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay['params']}
    kept = {names[id(p)] for p in no_decay['params']}
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert {'layers.0.blocks.0.gamma_1', 'layers.0.blocks.0.norm1.weight', 'head.bias', 'norm.weight',
            'patch_embed.norm.weight', 'layers.0.blocks.0.modulation.f.bias'} <= kept
    assert {'head.weight', 'layers.0.blocks.0.modulation.f.weight', 'patch_embed.proj.weight',
            'layers.0.blocks.0.modulation.focal_layers.0.0.weight',
            'layers.0.blocks.0.modulation.h.weight'} <= decayed


def test_optimizer_learning_rate_is_scaled():
    c = cfg.load_config(None, ['TRAIN.BASE_LR', '1e-3', 'TRAIN.OPTIMIZER.BETAS', '(0.8, 0.9)'])
    opt = build_optimizer(c, nn.Linear(2, 2), lr_scale=4.0)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]['lr'] == pytest.approx(4e-3) and opt.param_groups[0]['betas'] == (0.8, 0.9)


# ---------------------------------------------------------------------------------------------------
# Transforms and data sets
# ---------------------------------------------------------------------------------------------------

def test_transforms():
    c = cfg.load_config(None, ['DATA.IMG_SIZE', '224'])
    image = Image.new('RGB', (300, 400))
    assert build_transform(False, c)(image).shape == (3, 224, 224)
    assert build_transform(True, c)(image).shape == (3, 224, 224)
    resize = build_transform(False, c).transforms[0]
    assert (resize.resize, resize.crop, resize.interpolation.value) == (256, 224, 'bicubic')
    small = cfg.load_config(None, ['DATA.IMG_SIZE', '32'])
    first = build_transform(True, small).transforms[0]
    crop = first.transforms[-1]
    assert type(crop).__name__ == 'RandomCrop' and crop.padding == 4
    assert build_transform(True, small)(Image.new('RGB', (32, 32))).shape == (3, 32, 32)


def test_zip_layout(tmp_path):
    # The official layout: train.zip and a map of "<zip>@/<path>\t<class>" lines.
    with zipfile.ZipFile(tmp_path / 'train.zip', 'w') as z:
        for i in range(4):
            buf = __import__('io').BytesIO()
            Image.new('RGB', (8, 8), (60 * i, 0, 0)).save(buf, format='PNG')
            z.writestr(f'c{i % 2}/img{i}.png', buf.getvalue())
    (tmp_path / 'train_map.txt').write_text(''.join(f'train.zip@/c{i % 2}/img{i}.png\t{i % 2}\n'
                                                    for i in range(4)))
    ds = ZipImageDataset(str(tmp_path / 'train.zip'), str(tmp_path / 'train_map.txt'))
    assert len(ds) == 4 and ds.num_classes == 2
    image, target = ds[3]
    assert target == 1 and image.getpixel((0, 0)) == (180, 0, 0)
    # What --zip reads: the same files through the data set builder, with the transform applied.
    c = cfg.load_config(None, ['DATA.DATA_PATH', str(tmp_path), 'DATA.ZIP_MODE', 'True', 'DATA.IMG_SIZE', '32'])
    built, num_classes = build_dataset('train', c, build_transform(False, c))
    assert num_classes == 2 and built[3][0].shape == (3, 32, 32) and built[3][1] == 1


# ---------------------------------------------------------------------------------------------------
# main.py end to end
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope='session')
def digits(readme_run) -> Path:
    """scikit-learn's 1797 handwritten digits as 32 px RGB PNGs: 1437 to train on, 360 held out;
    written and trained on by the README's quick start, as written (conftest.readme_run)."""
    folder, ((block, proc), *_) = readme_run
    assert proc.returncode == 0, f'the quick start ({block.where}) failed:\n{proc.stderr[-3000:]}'
    return folder / 'digits'


@pytest.fixture(scope='session')
def digits_run(digits) -> Path:
    return digits.parent / 'output' / 'focalnet_digits' / 'default'


def test_digits_reach_95_percent_within_10_epochs(digits_run):
    records = metrics(digits_run)
    assert [r['epoch'] for r in records] == list(range(10))
    for r in records:
        assert set(r) >= {'epoch', 'train_loss', 'val_loss', 'acc1', 'acc5', 'lr', 'epoch_time_s',
                          'max_accuracy'}
    assert records[-1]['acc1'] >= 95.0, records[-1]
    assert records[-1]['max_accuracy'] == max(r['acc1'] for r in records)
    assert records[-1]['train_loss'] < records[0]['train_loss']
    # The data set decided the classifier: ten digits.
    assert 'NUM_CLASSES: 10' in (digits_run / 'config.yaml').read_text()
    assert (digits_run / 'log_rank0.txt').is_file()
    assert list(digits_run.glob('events.out.tfevents.*'))


def test_checkpoints_load_with_weights_only(digits_run):
    ckpt = torch.load(digits_run / 'ckpt_epoch_9.pth', map_location='cpu', weights_only=True)
    assert {'model', 'optimizer', 'lr_scheduler', 'scaler', 'epoch', 'max_accuracy', 'config',
            'rng'} <= set(ckpt)
    assert ckpt['epoch'] == 9 and 'head.weight' in ckpt['model']
    assert ckpt['max_accuracy'] == metrics(digits_run)[-1]['max_accuracy']
    assert 'NAME: focalnet_digits' in ckpt['config']
    assert sorted(p.name for p in digits_run.glob('ckpt_epoch_*.pth')) == \
        sorted(f'ckpt_epoch_{e}.pth' for e in range(10))


def test_eval_reproduces_the_logged_accuracy(digits, digits_run):
    # Another batch size than in training: the accuracy must not depend on it.
    proc = run_main(['--cfg', DIGITS_CFG, '--data-path', str(digits), '--batch-size', '50',
                     '--output', str(digits_run.parents[1]), '--tag', 'default', '--eval',
                     '--resume', str(digits_run / 'ckpt_epoch_9.pth')])
    trained, evaluated = metrics(digits_run)[9], metrics(digits_run)[-1]
    assert evaluated['mode'] == 'eval'
    assert evaluated['acc1'] == pytest.approx(trained['acc1'], abs=1e-9)
    assert evaluated['acc5'] == pytest.approx(trained['acc5'], abs=1e-9)
    assert f' * Acc@1 {trained["acc1"]:.3f} Acc@5 {trained["acc5"]:.3f}' in proc.stdout


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('launcher', [
    'torch.distributed.run',     # what the torchrun command runs
    'torch.distributed.launch',  # the legacy launcher: passes --local-rank to the script
])
def test_two_process_run(tmp_path, launcher):
    launcher = [sys.executable, '-m', launcher, '--nproc_per_node', '2', '--master_port', str(_free_port())]
    # Accumulation (gradients exchanged on every second micro-batch only) and gradient checkpointing.
    proc = run_main(['--dataset', 'fake', '--batch-size', '8', '--output', str(tmp_path), '--accumulation-steps',
                     '2', '--use-checkpoint', '--opts', *SMOKE], launcher=launcher)
    # Every gradient has its parameter's strides, so DDP's buckets need no copies.
    assert 'Grad strides do not match' not in proc.stderr
    run_dir = tmp_path / 'focalnet_tiny_srf' / 'default'
    assert [r['epoch'] for r in metrics(run_dir)] == [0, 1]
    assert (run_dir / 'log_rank0.txt').is_file() and (run_dir / 'log_rank1.txt').is_file()
    rank1 = (run_dir / 'log_rank1.txt').read_text()
    assert 'rank 1 of 2' in rank1 and 'saved' not in rank1  # only rank 0 writes checkpoints
    # 64 images, 8 per process and step, two processes: 4 steps per epoch.
    log = (run_dir / 'log_rank0.txt').read_text()
    assert 'Train: [1/2][3/4]' in log and 'global batch 32 / 512' in log
    assert sorted(p.name for p in run_dir.glob('ckpt_epoch_*.pth')) == ['ckpt_epoch_0.pth', 'ckpt_epoch_1.pth']


def test_throughput_needs_no_data(tmp_path):
    proc = run_main(['--cfg', str(ROOT / 'configs' / 'focalnet_tiny_srf.yaml'), '--throughput',
                     '--batch-size', '1', '--output', str(tmp_path), '--opts', 'DATA.IMG_SIZE', '32'])
    line = [l for l in proc.stdout.splitlines() if 'throughput' in l][-1]
    assert 'images/s' in line and 'params 28.43M' in line and 'GFLOPs' in line


def test_non_finite_loss_stops_before_saving(tmp_path):
    proc = run_main(['--dataset', 'fake', '--batch-size', '8', '--output', str(tmp_path), '--opts', *SMOKE,
                     'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.BASE_LR', '1e36', 'TRAIN.CLIP_GRAD', '0.0'],
                    check=False)
    assert proc.returncode == 3, proc.stderr
    assert 'the loss is nan at epoch 0 step' in proc.stderr or 'the loss is inf at epoch 0 step' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not list(tmp_path.rglob('*.pth'))


@pytest.mark.parametrize('args, message', [
    (['--cfg', 'configs/nope.yaml'], 'config file not found: configs/nope.yaml'),
    (['--opts', 'TRAIN.EPOCH', '3'], 'unknown config key in --opts: TRAIN.EPOCH (did you mean TRAIN.EPOCHS?)'),
    (['--data-path', '/no/such/folder'], 'data path not found: /no/such/folder'),
    (['--dataset', 'fake', '--eval', '--resume', '/no/ckpt.pth', '--opts', *SMOKE],
     'checkpoint not found: /no/ckpt.pth'),
])
def test_user_mistakes_are_one_line_errors(tmp_path, args, message):
    proc = run_main([*args, '--output', str(tmp_path)], check=False)
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f'error: {message}'


def test_two_process_eval_counts_every_image_once(digits, digits_run, tmp_path):
    # The 360 held-out digits and one unreadable file: 361 files split unevenly over two processes
    # (181 and 180), the unreadable one skipped. Every readable image counts once: the accuracy of
    # training, over 360 images.
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(digits / 'val', data / 'val')
    (data / 'val' / '3' / 'unreadable.png').write_bytes(b'not an image')
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                '--master_port', str(_free_port())]
    run_main(['--cfg', DIGITS_CFG, '--data-path', str(data), '--output', str(tmp_path), '--eval',
              '--resume', str(digits_run / 'ckpt_epoch_9.pth'), '--opts', 'DATA.SKIP_CORRUPT', 'True'],
             launcher=launcher)
    folder = tmp_path / 'focalnet_digits' / 'default'
    evaluated = metrics(folder)[-1]
    assert evaluated['images'] == 360
    assert evaluated['acc1'] == pytest.approx(metrics(digits_run)[9]['acc1'], abs=1e-9)
    assert (folder / 'skipped_images.txt').read_text().startswith(str(data / 'val' / '3' / 'unreadable.png'))


def test_mismatching_checkpoint_is_a_one_line_error(digits, digits_run, tmp_path):
    proc = run_main(['--cfg', DIGITS_CFG, '--data-path', str(digits), '--output', str(tmp_path), '--eval',
                     '--resume', str(digits_run / 'ckpt_epoch_9.pth'), '--opts', 'MODEL.FOCAL.EMBED_DIM', '32'],
                    check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: checkpoint') and 'does not fit the model' in last and 'patch_embed' in last


def test_fine_tune_from_pretrained_weights_replaces_the_classifier(digits_run, tmp_path):
    # Ten-class digits weights, fine-tuned on a five-class data set: the body loads, the head is new.
    proc = run_main(['--dataset', 'fake', '--batch-size', '8', '--output', str(tmp_path),
                     '--pretrained', str(digits_run / 'ckpt_epoch_9.pth'),
                     '--opts', *SMOKE, 'MODEL.FOCAL.EMBED_DIM', '48', 'MODEL.NUM_CLASSES', '5',
                     'TRAIN.EPOCHS', '1', 'DATA.FAKE_SIZE', '16'])
    assert 'loaded official-layout weights' in proc.stdout and 'classifier re-initialised' in proc.stdout
    ckpt = torch.load(tmp_path / 'focalnet_tiny_srf' / 'default' / 'ckpt_epoch_0.pth', weights_only=True)
    assert ckpt['model']['head.weight'].shape == (5, 96)


@pytest.mark.parametrize('flag', [['--local_rank', '3'], ['--local-rank=3']])
def test_launcher_rank_argument_is_accepted_in_both_spellings(flag):
    import main
    args = main.parse_args(['--cfg', 'configs/focalnet_tiny_srf.yaml', *flag])
    assert args.local_rank == 3 and main.parse_args([]).local_rank is None
