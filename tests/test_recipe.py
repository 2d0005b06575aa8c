"""The release training recipe on real photographs (scikit-learn's two sample photos)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from timm.data import auto_augment

import config as cfg
from data import build_transform

ROOT = Path(__file__).resolve().parents[1]
RELEASE_CFG = str(ROOT / 'configs' / 'focalnet_tiny_srf.yaml')


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
