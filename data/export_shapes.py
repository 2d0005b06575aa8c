"""Write a small detection or segmentation data set: coloured shapes on scikit-learn's sample photos.

    python -m data.export_shapes coco /tmp/shapes_coco    # COCO layout, for python -m detection
    python -m data.export_shapes ade /tmp/shapes_ade      # ADE20K layout, for python -m segmentation

Each image is a crop of one of scikit-learn's two bundled photos (china.jpg, flower.jpg), mostly
desaturated, with disks, squares and triangles painted on it, each class in a colour family of its
own:

- coco: ``train2017/``, ``val2017/`` JPEGs and ``annotations/instances_{train,val}2017.json`` with
  polygon masks, boxes and areas; categories 1 disk, 2 square, 3 triangle. Every eighth image has no
  object (kept in validation; the detector's FILTER_EMPTY drops it from training).
- ade: ``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png`` label
  maps as ADEChallengeData2016 stores them: 1 photo, 2 disk, 3 square, 4 triangle, and 0 (unlabelled,
  ignored) on a one-pixel seam around every shape. Here every image has one shape of each class, in
  random order (a later one may cover an earlier one), on a grey photo: a small model sees every class
  in every crop.

No download; the same seed writes the same files. configs/demo/ holds the models that learn them.
"""
import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Class names in the order of their ids (COCO category ids 1..3; ADE label values 2..4, after 'photo').
SHAPES = ('disk', 'square', 'triangle')
SEG_CLASSES = ('photo',) + SHAPES
COLOURS = {'disk': (40, 200, 70), 'square': (220, 50, 40), 'triangle': (50, 90, 230)}
COLOUR_KEPT = 0.3    # how much of the photo's colour stays: shapes stand out, the photo stays a photo
TRAIN, VAL = 64, 16  # images per split
VAL_SIZE = (120, 160)  # validation images share one size: on the CPU every new size costs a set-up


@dataclass
class Scene:
    image: Image.Image
    shapes: List[Tuple[str, List[float]]]  # (class name, polygon x0, y0, x1, y1, ...) per shape


def _polygon(kind: str, x: int, y: int, s: int) -> List[float]:
    if kind == 'square':
        return [x, y, x + s, y, x + s, y + s, x, y + s]
    if kind == 'triangle':
        return [x + s / 2, y, x + s, y + s, x, y + s]
    angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)  # a disk, as COCO stores round things
    r = s / 2
    return np.stack([x + r + r * np.cos(angles), y + r + r * np.sin(angles)], 1).round(2).ravel().tolist()


def make_scene(rng: np.random.Generator, photos, size: Tuple[int, int], empty: bool = False,
               every_class: bool = False) -> Scene:
    """One to three shapes that do not overlap (none if ``empty``) on a mostly desaturated photo; or,
    with ``every_class``, one shape of each class in random order (a later one may cover an earlier
    one) on a grey photo."""
    h, w = size
    photo = photos[int(rng.integers(len(photos)))]
    # A crop of 35% to 100% of the photo's height, of the image's aspect, resized to the image.
    ch = int(photo.shape[0] * rng.uniform(0.35, 1.0))
    cw = min(photo.shape[1], int(ch * w / h))
    top, left = int(rng.integers(0, photo.shape[0] - ch + 1)), int(rng.integers(0, photo.shape[1] - cw + 1))
    crop = Image.fromarray(photo[top:top + ch, left:left + cw]).resize((w, h), Image.BILINEAR)
    pixels = np.asarray(crop, dtype=np.float32)
    grey = pixels.mean(axis=2, keepdims=True)
    kept = 0.0 if every_class else COLOUR_KEPT
    image = Image.fromarray(np.clip(grey + kept * (pixels - grey), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    shapes, placed = [], []
    if every_class:
        kinds = [SHAPES[k] for k in rng.permutation(len(SHAPES))]
    else:
        kinds = [None] * (0 if empty else int(rng.integers(1, 4)))  # drawn below, once placed
    for kind in kinds:
        # A triangle fills half its box: a larger box gives the classes similar areas.
        s = int(rng.integers(min(h, w) // 5, min(h, w) // 2))
        if kind == 'triangle':
            s = min(int(s * 1.4), min(h, w) - 1)
        x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        if not every_class and any(x < a + b + 2 and a < x + s + 2 and y < c + b + 2 and c < y + s + 2
                                   for a, c, b in placed):
            continue  # no overlaps: every mask is its whole shape
        placed.append((x, y, s))
        kind = kind or SHAPES[int(rng.integers(len(SHAPES)))]
        colour = tuple(int(np.clip(v + rng.integers(-30, 31), 0, 255)) for v in COLOURS[kind])
        polygon = _polygon(kind, x, y, s)
        draw.polygon(polygon, fill=colour)
        shapes.append((kind, polygon))
    return Scene(image, shapes)


def scenes(seed: int = 0, every_class: bool = False):
    """(split, index, scene) of every image of both splits, the same for a seed."""
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for split, n in (('train', TRAIN), ('val', VAL)):
        for i in range(n):
            if split == 'val':
                size = VAL_SIZE if i % 4 else VAL_SIZE[::-1]
            else:
                size = (int(rng.integers(96, 161)), int(rng.integers(128, 193)))
                size = size[::-1] if rng.random() < 0.25 else size
            yield split, i, make_scene(rng, photos, size, empty=i % 8 == 5 and not every_class,
                                       every_class=every_class)


def _mask(size: Tuple[int, int], polygon: List[float]) -> np.ndarray:
    canvas = Image.new('L', size, 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=np.uint8)


def write_coco(root, seed: int = 0) -> Path:
    root = Path(root)
    documents = {}
    for split, i, scene in scenes(seed):
        folder = root / f'{split}2017'
        folder.mkdir(parents=True, exist_ok=True)
        doc = documents.setdefault(split, {'images': [], 'annotations': [], 'categories': [
            {'id': k + 1, 'name': name, 'supercategory': 'shape'} for k, name in enumerate(SHAPES)]})
        image_id = len(doc['images']) + 1
        name = f'{image_id:012d}.jpg'
        scene.image.save(folder / name, quality=92)
        doc['images'].append({'id': image_id, 'file_name': name, 'width': scene.image.width,
                              'height': scene.image.height})
        for kind, polygon in scene.shapes:
            ys, xs = np.nonzero(_mask(scene.image.size, polygon))
            doc['annotations'].append({
                'id': len(doc['annotations']) + 1, 'image_id': image_id, 'category_id': SHAPES.index(kind) + 1,
                'segmentation': [polygon], 'area': float(len(xs)), 'iscrowd': 0,
                'bbox': [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                         float(ys.max() - ys.min() + 1)]})
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    for split, doc in documents.items():
        (root / 'annotations' / f'instances_{split}2017.json').write_text(json.dumps(doc))
    return root


def write_ade(root, seed: int = 0) -> Path:
    root = Path(root)
    folders = {'train': 'training', 'val': 'validation'}
    for split, i, scene in scenes(seed, every_class=True):
        label = np.ones((scene.image.height, scene.image.width), np.uint8)  # 1: the photo
        for kind, polygon in scene.shapes:
            shape = Image.fromarray(_mask(scene.image.size, polygon) * 255)
            grown = np.asarray(shape.filter(ImageFilter.MaxFilter(3))) > 0
            shrunk = np.asarray(shape.filter(ImageFilter.MinFilter(3))) > 0
            label[np.asarray(shape) > 0] = SEG_CLASSES.index(kind) + 1
            label[grown & ~shrunk] = 0  # the seam, where painted edges blur into the photo
        name = f'shapes_{split}_{i:05d}'
        for kind, folder in (('images', root / 'images' / folders[split]),
                             ('annotations', root / 'annotations' / folders[split])):
            folder.mkdir(parents=True, exist_ok=True)
        scene.image.save(root / 'images' / folders[split] / f'{name}.jpg', quality=92)
        Image.fromarray(label, mode='L').save(root / 'annotations' / folders[split] / f'{name}.png')
    return root


WRITERS = {'coco': write_coco, 'ade': write_ade}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser('python -m data.export_shapes', description=__doc__.splitlines()[0])
    parser.add_argument('layout', choices=sorted(WRITERS), help='coco (detection) or ade (segmentation)')
    parser.add_argument('root', help='folder to write the data set into')
    parser.add_argument('--seed', type=int, default=0, help='another seed draws other scenes (default 0)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if Path(args.root).exists() and not Path(args.root).is_dir():
        print(f'python -m data.export_shapes: error: {args.root} is a file, not a folder', file=sys.stderr)
        return 2
    root = WRITERS[args.layout](args.root, args.seed)
    count = sum(1 for p in root.rglob('*.jpg'))
    print(f'wrote {count} images ({TRAIN} train, {VAL} val) in the {args.layout} layout under {root}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
