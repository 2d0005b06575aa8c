"""Hostile COCO instances files and ADE20K-layout pairs: every way a data set can be malformed that
the checks in detection/annotations.py and segmentation/data.py must name, several of each kind.

``COCO_CASES`` maps a case name to (a change to a valid document, text the error must contain).
The change takes the document (a dict made by :func:`valid_coco`) and returns the document to write:
usually the same dict changed in place, sometimes another JSON value altogether. ``DEGENERATE`` are
well-formed objects no detector can learn from, which are dropped and counted rather than refused.
``ADE_CASES`` damage an ADE20K-layout folder made by :func:`make_ade_pairs`.
"""
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
from PIL import Image

from pycocotools import mask as mask_util

W, H = 64, 48


def _rle(mask: np.ndarray, compressed: bool) -> dict:
    if compressed:
        rle = mask_util.encode(np.asfortranarray(mask))
        return {'size': rle['size'], 'counts': rle['counts'].decode('ascii')}
    flat = mask.flatten(order='F')
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {'size': list(mask.shape), 'counts': ([0] + counts) if flat[0] else counts}


def valid_coco() -> dict:
    """Two images of 64x48, three objects (a polygon, an uncompressed and a compressed RLE), two
    categories with ids 3 and 7."""
    disc = np.zeros((H, W), np.uint8)
    disc[10:30, 20:40] = 1
    return {
        'images': [{'id': 1, 'file_name': 'a.jpg', 'width': W, 'height': H},
                   {'id': 2, 'file_name': 'b.jpg', 'width': W, 'height': H}],
        'annotations': [
            {'id': 11, 'image_id': 1, 'category_id': 3, 'bbox': [5, 5, 20, 20], 'area': 400, 'iscrowd': 0,
             'segmentation': [[5, 5, 25, 5, 25, 25, 5, 25]]},
            {'id': 12, 'image_id': 1, 'category_id': 7, 'bbox': [20, 10, 20, 20], 'area': 400, 'iscrowd': 1,
             'segmentation': _rle(disc, compressed=False)},
            {'id': 21, 'image_id': 2, 'category_id': 7, 'bbox': [20, 10, 20, 20], 'area': 400, 'iscrowd': 0,
             'segmentation': _rle(disc, compressed=True)},
        ],
        'categories': [{'id': 3, 'name': 'square'}, {'id': 7, 'name': 'disc'}],
    }


def _ann(doc: dict, i: int = 0) -> dict:
    return doc['annotations'][i]


def _set(path: Tuple, value) -> Callable[[dict], dict]:
    """A change setting doc[path...] (use the key ``'-'`` to delete the last key instead)."""
    def change(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        if value == '-':
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return doc
    return change


def _append(section: str, item) -> Callable[[dict], dict]:
    def change(doc):
        doc[section].append(item(doc) if callable(item) else item)
        return doc
    return change


DELETE = '-'
_RLE_SIZE = ('annotations', 1, 'segmentation', 'size')
_RLE_COUNTS = ('annotations', 1, 'segmentation', 'counts')
_CRLE_COUNTS = ('annotations', 2, 'segmentation', 'counts')

COCO_CASES: Dict[str, Tuple[Callable[[dict], object], str]] = {
    # the document as a whole
    'a JSON list': (lambda d: [d], 'this one is a list'),
    'a JSON string': (lambda d: 'images', 'this one is a str'),
    'a JSON number': (lambda d: 3, 'this one is a int'),
    'no categories': (_set(('categories',), DELETE), 'no "categories" list'),
    'no images': (_set(('images',), DELETE), 'no "images" list'),
    'no annotations': (_set(('annotations',), DELETE), 'no "annotations" list'),
    'categories a mapping': (_set(('categories',), {'3': 'square'}), '"categories" must be a list; got a dict'),
    'images null': (_set(('images',), None), '"images" must be a list; got a NoneType'),
    'empty categories': (_set(('categories',), []), '"categories" is empty'),
    # categories
    'category a string': (_append('categories', 'cat'), 'categories[2]: must be an object'),
    'category id a string': (_set(('categories', 0, 'id'), '3'), 'categories[0]: "id" must be an integer; got \'3\''),
    'category id missing': (_set(('categories', 1, 'id'), DELETE), 'categories[1]: "id" must be an integer; got null'),
    'duplicate category id': (_append('categories', {'id': 3, 'name': 'again'}), 'category 3: "id" is used by two'),
    'category name a number': (_set(('categories', 0, 'name'), 5), 'category 3: "name" must be a string'),
    # images
    'image id a string': (_set(('images', 0, 'id'), '1'), 'images[0]: "id" must be an integer; got \'1\''),
    'image id a float': (_set(('images', 1, 'id'), 2.0), 'images[1]: "id" must be an integer; got 2.0'),
    'image id a bool': (_set(('images', 0, 'id'), True), 'images[0]: "id" must be an integer; got true'),
    'image a list': (_append('images', [3, 'c.jpg']), 'images[2]: must be an object'),
    'duplicate image id': (_append('images', {'id': 1, 'file_name': 'c.jpg', 'width': W, 'height': H}),
                           'image 1: "id" is used by two images'),
    'image without height': (_set(('images', 0, 'height'), DELETE), 'image 1: no "height"'),
    'image without width': (_set(('images', 1, 'width'), DELETE), 'image 2: no "width"'),
    'image width 0': (_set(('images', 0, 'width'), 0), 'image 1: "width" must be a positive integer; got 0'),
    'image height a string': (_set(('images', 0, 'height'), '48'), '"height" must be a positive integer; got \'48\''),
    'image without file_name': (_set(('images', 0, 'file_name'), DELETE), 'image 1: "file_name" must be a non-empty'),
    'image file_name empty': (_set(('images', 1, 'file_name'), ''), 'image 2: "file_name" must be a non-empty'),
    # annotations: ids and references
    'annotation a number': (_append('annotations', 4), 'annotations[3]: must be an object'),
    'annotation id missing': (_set(('annotations', 0, 'id'), DELETE), 'annotations[0]: "id" must be an integer'),
    'annotation id a string': (_set(('annotations', 2, 'id'), '21'), 'annotations[2]: "id" must be an integer'),
    'duplicate annotation id': (_set(('annotations', 2, 'id'), 11), 'annotation 11: "id" is used by two annotations'),
    'unknown image': (_set(('annotations', 0, 'image_id'), 99), 'annotation 11 (image 99): "image_id" 99 is not among'),
    'image_id a string': (_set(('annotations', 0, 'image_id'), '1'), 'annotation 11: "image_id" must be an integer'),
    'image_id missing': (_set(('annotations', 1, 'image_id'), DELETE), 'annotation 12: "image_id" must be an integer'),
    'unknown category': (_set(('annotations', 0, 'category_id'), 99), 'annotation 11 (image 1): "category_id" 99 is not among the categories'),
    'category_id a string': (_set(('annotations', 1, 'category_id'), '7'), '"category_id" \'7\' is not among'),
    'category_id missing': (_set(('annotations', 2, 'category_id'), DELETE), 'annotation 21 (image 2): "category_id" null'),
    'iscrowd 2': (_set(('annotations', 0, 'iscrowd'), 2), '"iscrowd" must be 0 or 1; got 2'),
    'iscrowd a string': (_set(('annotations', 0, 'iscrowd'), 'no'), '"iscrowd" must be 0 or 1'),
    'negative area': (_set(('annotations', 0, 'area'), -4), '"area" must be a number >= 0; got -4'),
    'area NaN': (_set(('annotations', 0, 'area'), float('nan')), '"area" must be a number >= 0; got NaN'),
    # annotations: boxes
    'no bbox': (_set(('annotations', 0, 'bbox'), DELETE), 'annotation 11 (image 1): no "bbox"'),
    'bbox of strings': (_set(('annotations', 0, 'bbox'), ['5', '5', '20', '20']), '"bbox" must be 4 numbers'),
    'bbox of 3 numbers': (_set(('annotations', 1, 'bbox'), [5, 5, 20]), 'annotation 12 (image 1): "bbox" must be 4 numbers'),
    'bbox a mapping': (_set(('annotations', 0, 'bbox'), {'x': 1}), '"bbox" must be 4 numbers'),
    'bbox with NaN': (_set(('annotations', 0, 'bbox'), [5, float('nan'), 20, 20]), '"bbox" must be 4 numbers'),
    'bbox with infinity': (_set(('annotations', 0, 'bbox'), [5, 5, float('inf'), 20]), '"bbox" must be 4 numbers'),
    'bbox of booleans': (_set(('annotations', 0, 'bbox'), [True, 5, 20, 20]), '"bbox" must be 4 numbers'),
    'negative bbox width': (_set(('annotations', 0, 'bbox'), [5, 5, -20, 20]), 'negative width or height'),
    # annotations: polygons
    'no segmentation': (_set(('annotations', 0, 'segmentation'), DELETE), 'annotation 11 (image 1): no "segmentation"'),
    'empty segmentation': (_set(('annotations', 0, 'segmentation'), []), '"segmentation" is an empty list'),
    'polygon of 2 points': (_set(('annotations', 0, 'segmentation'), [[5, 5, 25, 25]]), 'has 4 coordinates; a polygon needs at least 3 points'),
    'polygon of 1 point': (_set(('annotations', 0, 'segmentation'), [[5, 5]]), 'has 2 coordinates'),
    'empty polygon': (_set(('annotations', 0, 'segmentation'), [[5, 5, 25, 5, 25, 25], []]), '"segmentation"[1] has 0 coordinates'),
    'odd coordinates': (_set(('annotations', 0, 'segmentation'), [[5, 5, 25, 5, 25, 25, 5]]), 'has 7 coordinates'),
    'polygon of strings': (_set(('annotations', 0, 'segmentation'), [['5', '5', '25', '5', '25', '25']]), 'must be a polygon'),
    'flat polygon': (_set(('annotations', 0, 'segmentation'), [5, 5, 25, 5, 25, 25]), '"segmentation"[0] must be a polygon'),
    'segmentation a string': (_set(('annotations', 0, 'segmentation'), 'mask.png'), '"segmentation" must be a list of polygons or an RLE'),
    # annotations: RLE
    'RLE of another size': (_set(_RLE_SIZE, [W, H]), f'"segmentation"."size" [{W}, {H}] is not its image\'s [height, width] [{H}, {W}]'),
    'RLE size missing': (_set(_RLE_SIZE, DELETE), '"segmentation"."size" must be [height, width]; got null'),
    'RLE size of 3': (_set(_RLE_SIZE, [H, W, 3]), '"segmentation"."size" must be [height, width]'),
    'RLE negative counts': (lambda d: _set(_RLE_COUNTS, [-5] + _ann(d, 1)['segmentation']['counts'][1:] + [5])(d),
                            '"segmentation"."counts" must be run lengths >= 0; got [-5]'),
    'RLE counts too few': (lambda d: _set(_RLE_COUNTS, _ann(d, 1)['segmentation']['counts'][:-1])(d), 'add up to'),
    'RLE counts of strings': (_set(_RLE_COUNTS, ['a', 'b']), 'must be run lengths >= 0'),
    'RLE counts missing': (_set(_RLE_COUNTS, DELETE), '"counts" must be a list of run lengths or a compressed RLE string'),
    'compressed RLE bad character': (_set(_CRLE_COUNTS, 'abc\x7f'), 'is not a compressed RLE string'),
    'compressed RLE cut short': (lambda d: _set(_CRLE_COUNTS, _ann(d, 2)['segmentation']['counts'][:-2])(d),
                                 'annotation 21 (image 2): "segmentation"."counts" '),
    'compressed RLE short a run': (_set(_CRLE_COUNTS, '0'), 'decodes to runs covering 0 pixels'),
    'compressed RLE negative run': (_set(_CRLE_COUNTS, '0@'), 'covering -16 pixels (some negative: True)'),
    'compressed RLE of another size': (_set(('annotations', 2, 'segmentation', 'size'), [H + 1, W]), 'is not its image\'s'),
}

# Well-formed objects without usable area, appended to image 1: (the object's changes, count reason).
DEGENERATE: Dict[str, Tuple[dict, str]] = {
    'zero-width box': ({'bbox': [5, 5, 0, 20]}, 'box under one pixel wide or high'),
    'zero-area box': ({'bbox': [5, 5, 0, 0]}, 'box under one pixel wide or high'),
    'half-pixel box': ({'bbox': [5, 5, 0.5, 20]}, 'box under one pixel wide or high'),
    'box outside the image': ({'bbox': [W + 10, 5, 20, 20]}, 'box outside its image'),
    'box left of the image': ({'bbox': [-30, 5, 20, 20]}, 'box outside its image'),
    'collinear polygon': ({'segmentation': [[5, 5, 10, 10, 15, 15]]}, 'mask of area 0'),
    'polygon of one point thrice': ({'segmentation': [[8, 8, 8, 8, 8, 8]]}, 'mask of area 0'),
    'empty RLE': ({'segmentation': {'size': [H, W], 'counts': [H * W]}}, 'mask of area 0'),
}


def degenerate_object(doc: dict, changes: dict, aid: int) -> dict:
    obj = {'id': aid, 'image_id': 1, 'category_id': 3, 'bbox': [5, 5, 20, 20], 'iscrowd': 0,
           'segmentation': [[5, 5, 25, 5, 25, 25, 5, 25]]}
    obj.update(changes)
    return obj


def write_coco(root: Path, split: str, document) -> Path:
    """The document as ``root/annotations/instances_<split>.json``, with real JPEGs for its images
    (when it has a list of images with file names); NaN and infinity written as Python's json does."""
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    images = document.get('images') if isinstance(document, dict) else None
    for image in images if isinstance(images, list) else []:
        if isinstance(image, dict) and isinstance(image.get('file_name'), str) and image['file_name']:
            rng = np.random.default_rng(len(image['file_name']))
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / split / image['file_name'])
    path = root / 'annotations' / f'instances_{split}.json'
    path.write_text(json.dumps(document))
    return path


# ---- ADE20K layout ----------------------------------------------------------------------------------

def make_ade_pairs(root: Path, n: int = 4, size: Tuple[int, int] = (40, 32)) -> Path:
    """An ADE20K-layout folder with n training and n validation pairs of ``size`` (w, h): random RGB
    JPEGs and L-mode PNG labels with classes 0..3."""
    rng = np.random.default_rng(0)
    w, h = size
    for split in ('training', 'validation'):
        (root / 'images' / split).mkdir(parents=True, exist_ok=True)
        (root / 'annotations' / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f'ADE_{split}_{i:08d}'
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / 'images' / split / f'{name}.jpg')
            Image.fromarray(rng.integers(0, 4, (h, w), dtype=np.uint8), mode='L').save(
                root / 'annotations' / split / f'{name}.png')
    return root


def _label(root: Path, i: int = 1, split: str = 'validation') -> Path:
    return root / 'annotations' / split / f'ADE_{split}_{i:08d}.png'


def _image(root: Path, i: int = 1, split: str = 'validation') -> Path:
    return root / 'images' / split / f'ADE_{split}_{i:08d}.jpg'


def _replace_with_fifo(path: Path):
    path.unlink()
    os.mkfifo(path)


def png_header(width: int, height: int, mode: int = 0) -> bytes:
    """A PNG whose header says width x height 8-bit pixels (colour type ``mode``: 0 grey, 2 RGB)
    and whose data is cut off: what a decoder sees of a decompression bomb before decoding it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, mode, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'\x00' * 64)) + chunk(b'IEND', b''))


def _bomb(path: Path, mode: int = 0):
    path.write_bytes(png_header(20000, 20000, mode))  # 400 million pixels


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])


# Damage to a folder made by make_ade_pairs: (change, text the error names). Each case damages the
# validation split, which every run (training or --eval) reads.
ADE_CASES: Dict[str, Tuple[Callable[[Path], None], str]] = {
    'missing label': (lambda r: _label(r).unlink(), 'ADE_validation_00000001.png (missing)'),
    'label a FIFO': (lambda r: _replace_with_fifo(_label(r)), 'ADE_validation_00000001.png (a FIFO (named pipe))'),
    'label a folder': (lambda r: (_label(r).unlink(), _label(r).mkdir()), '(a folder)'),
    'label a broken link': (lambda r: (_label(r).unlink(), _label(r).symlink_to(r / 'nowhere.png')),
                            '(a broken symbolic link)'),
    'label of another size': (lambda r: Image.new('L', (41, 32)).save(_label(r)), 'the label map is 41x32 but its image'),
    'label transposed': (lambda r: Image.new('L', (32, 40)).save(_label(r)), 'the label map is 32x40'),
    'colour label': (lambda r: Image.new('RGB', (40, 32)).save(_label(r)), 'not RGB pixels'),
    '16-bit label': (lambda r: Image.new('I;16', (40, 32)).save(_label(r)), 'not I'),
    'label bomb': (lambda r: _bomb(_label(r)), '400000000 pixels'),
    'image bomb': (lambda r: _bomb(_image(r), mode=2), '400000000 pixels'),
    'label not an image': (lambda r: _label(r).write_text('root:x:0:0'), 'ADE_validation_00000001.png'),
    'truncated label header': (lambda r: _label(r).write_bytes(_label(r).read_bytes()[:20]), 'ADE_validation_00000001.png'),
}
