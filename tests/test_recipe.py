"""The release training recipe on real photographs (random JPEG crops of scikit-learn's two sample
photos, see tests/photos.py): RandAugment's posterize, every release config's training transform on
thousands of crops, and the full recipe through main.py."""
import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment

import config as cfg
from data import build_transform
from data.robust import open_image

ROOT = Path(__file__).resolve().parents[1]
RELEASE_CFG = str(ROOT / 'configs' / 'focalnet_tiny_srf.yaml')
RELEASE_CFGS = sorted(str(p) for p in (ROOT / 'configs').glob('focalnet_*.yaml'))


def _photo_crop(seed: int = 0) -> Image.Image:
    from sklearn.datasets import load_sample_images
    rng = np.random.RandomState(seed)
    photo = load_sample_images().images[seed % 2]
    h, w = rng.randint(120, 400, size=2)
    top, left = rng.randint(0, photo.shape[0] - h), rng.randint(0, photo.shape[1] - w)
    return Image.fromarray(photo[top:top + h, left:left + w])


def _augment_ops(transform, name: str):
    """The timm AugmentOp called ``name`` in the RandAugment / AutoAugment of ``transform``."""
    found = []
    for step in transform.transforms:
        ops = list(getattr(step, 'ops', ()))
        for sub_policy in getattr(step, 'policy', ()):
            ops.extend(sub_policy)
        found += [op for op in ops if isinstance(op, auto_augment.AugmentOp) and op.name == name]
    assert found, f'no {name} op in {transform}'
    return found


@pytest.mark.parametrize('magnitude, bits', [(10, 0), (7.5, 1), (5, 2), (2.5, 3), (0, 4)])
def test_release_posterize_at_every_magnitude(magnitude, bits):
    # The release recipe's RandAugment posterizes to 4 - int(0.4 * m) bits; at m = 10 that is 0 bits,
    # which the Pillow of the releases turned into a black image (Pillow 13 refuses it).
    config = cfg.load_config(RELEASE_CFG, ['AUG.AUTO_AUGMENT', 'rand-m9-mstd0.5-inc1'])
    op, = _augment_ops(build_transform(True, config), 'PosterizeIncreasing')
    op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0
    image = _photo_crop()
    out = op(image)
    assert out.mode == 'RGB' and out.size == image.size
    pixels = np.asarray(out)
    if bits == 0:
        assert pixels.max() == 0
    else:
        # Otherwise exactly what Pillow's own posterize gives, and the low bits are gone.
        assert np.array_equal(pixels, np.asarray(ImageOps.posterize(image, bits)))
        assert np.array_equal(pixels, np.asarray(image) & (0xFF << (8 - bits) & 0xFF))


def test_autoaugment_v0_posterize_to_zero_bits():
    # AutoAugment's v0 policy holds ('Posterize', 0.8, 2): 0 bits whenever it is drawn.
    config = cfg.load_config(RELEASE_CFG, ['AUG.AUTO_AUGMENT', 'v0'])
    ops = {op.magnitude: op for op in _augment_ops(build_transform(True, config), 'Posterize')}
    image = _photo_crop(1)
    ops[2].prob = ops[6].prob = 1.0
    assert np.asarray(ops[2](image)).max() == 0
    assert np.array_equal(np.asarray(ops[6](image)), np.asarray(ImageOps.posterize(image, 2)))


def _transform_groups():
    """Release configs grouped by everything their training transform is built from."""
    groups = defaultdict(list)
    for path in RELEASE_CFGS:
        c = cfg.load_config(path)
        groups[c.DATA.IMG_SIZE, c.DATA.INTERPOLATION, c.AUG.dump()].append(path)
    return list(groups.values())


def test_every_release_config_is_in_a_transform_group():
    assert len(RELEASE_CFGS) == 15
    assert sorted(p for g in _transform_groups() for p in g) == RELEASE_CFGS


@pytest.mark.parametrize('paths', _transform_groups(),
                         ids=lambda g: f'{cfg.load_config(g[0]).DATA.IMG_SIZE}px-{len(g)}-configs')
def test_release_training_transform_on_thousands_of_photo_crops(paths, photo_folder, one_thread):
    # 3000 crops of 120-500 px and aspects 1:4 to 4:1, each transformed once. At ~1/660 per image,
    # the unfixed posterize raised a few times in every such run.
    files = sorted((photo_folder(3000) / 'train').rglob('*.jpg'))
    assert len(files) == 3000
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    transforms = [build_transform(True, cfg.load_config(p)) for p in paths]
    assert len({repr(t) for t in transforms}) == 1  # the configs of a group build the same transform
    size = cfg.load_config(paths[0]).DATA.IMG_SIZE
    black = []
    op, = _augment_ops(transforms[0], 'PosterizeIncreasing')
    posterize = op.aug_fn
    op.aug_fn = lambda img, bits, **kw: (black.append(bits) if bits <= 0 else None) or posterize(img, bits, **kw)
    for i, path in enumerate(files):
        # Every config of the group runs its own transform; the group's first takes the rest.
        out = transforms[i % len(transforms) if i < 10 * len(transforms) else 0](open_image(str(path)))
        assert out.shape == (3, size, size) and out.dtype == torch.float32, path
        assert torch.isfinite(out).all(), path
    assert black, 'no image drew posterize at magnitude 10; the test did not reach the faulty case'


def _run_main(args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, str(ROOT / 'main.py'), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'main.py exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


# The command of the report that found the fault, shrunk: the release recipe (RandAugment, mixup and
# cutmix, random erasing, label smoothing) with a small model at 64 px and 2 loader workers.
SHRINK = ['DATA.IMG_SIZE', '64', 'MODEL.FOCAL.EMBED_DIM', '16', 'DATA.NUM_WORKERS', '2',
          'TRAIN.WARMUP_EPOCHS', '1']


@pytest.mark.parametrize('name, depths', [('focalnet_tiny_srf', '[1, 1, 1, 1]'), ('focalnet_tiny_iso', '[2]')])
def test_release_recipe_trains_on_real_photos(name, depths, photo_folder, tmp_path):
    data = photo_folder(480, 64)
    epochs = 3
    _run_main(['--cfg', str(ROOT / 'configs' / f'{name}.yaml'), '--dataset', 'folder', '--data-path', str(data),
               '--batch-size', '32', '--output', str(tmp_path), '--tag', 'photos',
               '--opts', *SHRINK, 'MODEL.FOCAL.DEPTHS', depths, 'TRAIN.EPOCHS', str(epochs)])
    run = tmp_path / name / 'photos'
    saved = cfg.load_config(str(run / 'config.yaml'))
    # The release recipe ran, with the classes of the photo folder.
    assert (saved.AUG.AUTO_AUGMENT, saved.AUG.MIXUP, saved.AUG.CUTMIX, saved.AUG.REPROB) == \
        ('rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.25)
    assert saved.MODEL.LABEL_SMOOTHING == 0.1 and saved.DATA.NUM_WORKERS == 2 and saved.MODEL.NUM_CLASSES == 2
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == list(range(epochs))
    assert all(np.isfinite([r['train_loss'], r['val_loss']]).all() for r in records)
    # 480 images, batch 32: 15 steps an epoch, every one of them taken.
    log = (run / 'log_rank0.txt').read_text()
    assert f'Train: [{epochs - 1}/{epochs}][14/15]' in log, log[-2000:]
