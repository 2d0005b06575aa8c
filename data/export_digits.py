"""Write scikit-learn's bundled handwritten digits as an ImageFolder tree (train/ and val/).

    python -m data.export_digits /tmp/digits

1797 8x8 grey digits, upscaled to 32x32 RGB PNGs; a fixed random 360 of them are held out in val/.
No download: the digits ship with scikit-learn.
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def export_digits(root, num_val: int = 360, size: int = 32, seed: int = 0) -> Path:
    from sklearn.datasets import load_digits
    root = Path(root)
    digits = load_digits()
    order = np.random.RandomState(seed).permutation(len(digits.target))
    for i, idx in enumerate(order):
        folder = root / ('val' if i < num_val else 'train') / str(digits.target[idx])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[idx] / 16 * 255).astype(np.uint8)  # values are 0..16
        image = Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert('RGB')
        image.save(folder / f'{idx}.png')
    return root


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('root', help='folder to write train/ and val/ into')
    root = export_digits(parser.parse_args().root)
    print(f'wrote {sum(1 for _ in root.rglob("*.png"))} images under {root}')
