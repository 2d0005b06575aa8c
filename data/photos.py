"""Real photographs for the tests and benchmarks: random crops of scikit-learn's two sample photos (china.jpg and
flower.jpg, 640x427 each), resized to ImageNet-like sizes and aspects and re-encoded as JPEG files.
Nothing is shipped; the files are written where the test asks."""
from functools import lru_cache
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image


@lru_cache(maxsize=1)
def sample_photos() -> Tuple[Tuple[str, np.ndarray], ...]:
    """(class name, pixels) of each sample photo: 'china' and 'flower'."""
    from sklearn.datasets import load_sample_images
    bunch = load_sample_images()
    return tuple((Path(name).stem, pixels) for name, pixels in zip(bunch.filenames, bunch.images))


def random_crop(rng: np.random.RandomState, pixels: np.ndarray, sizes: Tuple[int, int]) -> Image.Image:
    """A crop of ``pixels`` resized to a width and a height drawn independently from ``sizes``
    (so aspects from about 1:4 to 4:1), covering 10% to 100% of the largest box of that aspect that
    fits in the photo."""
    width, height = rng.randint(sizes[0], sizes[1] + 1, size=2)
    photo_h, photo_w = pixels.shape[:2]
    fit = min(photo_w / width, photo_h / height)  # the largest box of this aspect, in target units
    scale = fit * np.sqrt(rng.uniform(0.1, 1.0))
    box_w, box_h = max(1, int(width * scale)), max(1, int(height * scale))
    left, top = rng.randint(0, photo_w - box_w + 1), rng.randint(0, photo_h - box_h + 1)
    crop = Image.fromarray(pixels[top:top + box_h, left:left + box_w])
    return crop.resize((int(width), int(height)), Image.BICUBIC)


def write_photo_folder(root, n_train: int, n_val: int = 0, *, seed: int = 0,
                       sizes: Tuple[int, int] = (120, 500)) -> Path:
    """``root``/train/<photo>/<i>.jpg (and ``root``/val/... when ``n_val``): an ImageFolder tree of
    random crops, alternating between the two photos (one class each), JPEG quality 70 to 95."""
    root = Path(root)
    rng = np.random.RandomState(seed)
    photos = sample_photos()
    for split, count in (('train', n_train), ('val', n_val)):
        for i in range(count):
            name, pixels = photos[i % len(photos)]
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            random_crop(rng, pixels, sizes).save(folder / f'{i:05d}.jpg', quality=int(rng.randint(70, 96)))
    return root
