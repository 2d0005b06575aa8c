"""One check of a COCO instances file before any work: structural problems stop the run, each named
by file, image or annotation id and key; degenerate objects are dropped and counted.

pycocotools and torchvision trust the file: a list instead of a mapping, a missing ``categories``, a
``bbox`` of strings, a polygon of two points, an RLE of another size than its image, a category id
that is not defined, or an image without ``height`` each end in a traceback from deep inside them,
sometimes after a whole training epoch, and two images sharing an id silently attach one image's
objects to the other's file. Here the whole file is read once, every problem is a line of the form

    <file>: annotation 17 (image 3): "bbox" must be 4 numbers [x, y, width, height]; got ['a', 1, 2, 3]

and the data set is only built from a file without any. Objects that are well-formed but cover no
area the detectors can learn from (a box under one pixel wide or high, or outside its image; a
polygon or RLE of area 0) are dropped from the training targets, as mmdetection's CocoDataset drops
them, and counted in the log; the evaluation keeps every annotation, as COCOeval scores them.
"""
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from data.files import not_regular
from data.robust import DataError

logger = logging.getLogger('focalnet')

# At most this many problems are listed in the log; the error names the first and counts the rest.
_LISTED = 20


class AnnotationError(DataError):
    """A COCO file that cannot be used; ``problems`` holds every line found."""

    def __init__(self, problems: List[str]):
        more = f' (and {len(problems) - 1} more problem(s) in the file, listed in the log)' if len(problems) > 1 else ''
        super().__init__(problems[0] + more)
        self.problems = problems


@dataclass
class CheckedCoco:
    """A COCO instances document that passed :func:`check_coco`, with what was noticed."""
    dataset: dict                              # the document, with iscrowd and area filled in
    degenerate: Dict[int, str] = field(default_factory=dict)  # annotation id -> why it is dropped


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _show(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + '...'


def read_json(path: str) -> Any:
    """The parsed file; a DataError naming the file, and the line and column of a syntax error."""
    problem = not_regular(path)
    if problem is not None:
        raise DataError(f'{path}: the annotation file is {problem}' if problem != 'not found'
                        else f'annotation file not found: {path}')
    try:
        with open(path, 'rb') as f:
            return json.loads(f.read().decode('utf-8'))
    except UnicodeDecodeError:
        raise DataError(f'{path}: not a JSON text file (it is not UTF-8 text)') from None
    except json.JSONDecodeError as e:
        raise DataError(f'{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}') from None
    except RecursionError:
        raise DataError(f'{path}: not a COCO file (JSON nested too deeply)') from None
    except OSError as e:
        raise DataError(f'cannot read the annotation file {path}: {e.strerror or e}') from None


def check_coco(path: str, document: Any, masks: bool = True) -> CheckedCoco:
    """Check a parsed COCO instances document; raise AnnotationError listing every structural
    problem (the first in the message, up to 20 in the log). ``masks``: every object must have a
    ``segmentation`` (the detector predicts masks); without, one that is there is still checked."""
    problems: List[str] = []

    def bad(where: str, message: str):
        problems.append(f'{path}: {where}{message}')

    if not isinstance(document, dict):
        raise AnnotationError([f'{path}: a COCO instances file is a JSON object with "images", '
                               f'"annotations" and "categories"; this one is a {type(document).__name__}'])
    for key in ('images', 'annotations', 'categories'):
        if key not in document:
            bad('', f'no "{key}" list (a COCO instances file has "images", "annotations" and "categories")')
        elif not isinstance(document[key], list):
            bad('', f'"{key}" must be a list; got a {type(document[key]).__name__}')
    if problems:
        raise AnnotationError(problems)

    categories = _check_categories(document['categories'], bad)
    images = _check_images(document['images'], bad)
    degenerate = _check_annotations(document['annotations'], images, categories, masks, bad)
    if problems:
        for line in problems[1:_LISTED]:
            logger.error(line)
        if len(problems) > _LISTED:
            logger.error(f'{path}: and {len(problems) - _LISTED} more problem(s)')
        raise AnnotationError(problems)
    return CheckedCoco(document, degenerate)


def _check_categories(categories: list, bad) -> set:
    ids = set()
    if not categories:
        bad('', '"categories" is empty: define at least one category')
    for i, category in enumerate(categories):
        if not isinstance(category, dict):
            bad(f'categories[{i}]: ', f'must be an object with "id" and "name"; got {_show(category)}')
            continue
        cid = category.get('id')
        if not _is_int(cid):
            bad(f'categories[{i}]: ', f'"id" must be an integer; got {_show(cid)}')
        elif cid in ids:
            bad(f'category {cid}: ', '"id" is used by two categories')
        else:
            ids.add(cid)
        if 'name' in category and not isinstance(category['name'], str):
            bad(f'category {cid}: ', f'"name" must be a string; got {_show(category["name"])}')
    return ids


def _check_images(images: list, bad) -> Dict[int, dict]:
    known: Dict[int, dict] = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict):
            bad(f'images[{i}]: ', f'must be an object with "id", "file_name", "width" and "height"; '
                                  f'got {_show(image)}')
            continue
        iid = image.get('id')
        if not _is_int(iid):
            bad(f'images[{i}]: ', f'"id" must be an integer; got {_show(iid)}')
            continue
        where = f'image {iid}: '
        if iid in known:
            bad(where, f'"id" is used by two images ({_show(known[iid].get("file_name"))} and '
                       f'{_show(image.get("file_name"))}): their objects could not be told apart')
            continue
        name = image.get('file_name')
        if not isinstance(name, str) or not name:
            bad(where, f'"file_name" must be a non-empty string; got {_show(name)}')
        for key in ('width', 'height'):
            if key not in image:
                bad(where, f'no "{key}" (the masks and the evaluation need the image size)')
            elif not _is_int(image[key]) or image[key] < 1:
                bad(where, f'"{key}" must be a positive integer; got {_show(image[key])}')
        known[iid] = image
    return known


def _check_annotations(annotations: list, images: Dict[int, dict], categories: set, masks: bool,
                       bad) -> Dict[int, str]:
    seen = set()
    degenerate: Dict[int, str] = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            bad(f'annotations[{i}]: ', f'must be an object; got {_show(ann)}')
            continue
        aid = ann.get('id')
        if not _is_int(aid):
            bad(f'annotations[{i}]: ', f'"id" must be an integer; got {_show(aid)}')
            continue
        if aid in seen:
            bad(f'annotation {aid}: ', '"id" is used by two annotations')
            continue
        seen.add(aid)
        image_id = ann.get('image_id')
        where = f'annotation {aid} (image {image_id}): ' if _is_int(image_id) else f'annotation {aid}: '
        if not _is_int(image_id):
            bad(where, f'"image_id" must be an integer; got {_show(image_id)}')
        elif image_id not in images:
            bad(where, f'"image_id" {image_id} is not among the images')
        category = ann.get('category_id')
        if not _is_int(category) or category not in categories:
            bad(where, f'"category_id" {_show(category)} is not among the categories '
                       f'({_show(sorted(categories), 40)})')
        crowd = ann.setdefault('iscrowd', 0)
        if crowd not in (0, 1) or isinstance(crowd, float):
            bad(where, f'"iscrowd" must be 0 or 1; got {_show(crowd)}')
        if 'area' in ann and (not _is_number(ann['area']) or ann['area'] < 0):
            bad(where, f'"area" must be a number >= 0; got {_show(ann["area"])}')
        image = images.get(image_id) if _is_int(image_id) else None
        box_area = _check_bbox(ann, image, where, bad)
        mask_area = _check_segmentation(ann, image, where, bad) if masks or 'segmentation' in ann else None
        if box_area is None or mask_area is False:
            continue
        ann.setdefault('area', mask_area if mask_area is not None else box_area)
        why = _degenerate(ann, image, mask_area)
        if why:
            degenerate[aid] = why
    return degenerate


def _check_bbox(ann: dict, image: Optional[dict], where: str, bad) -> Optional[float]:
    """The box's area, or None after reporting a problem."""
    if 'bbox' not in ann:
        bad(where, 'no "bbox" (every object needs its box [x, y, width, height])')
        return None
    box = ann['bbox']
    if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
        bad(where, f'"bbox" must be 4 numbers [x, y, width, height]; got {_show(box)}')
        return None
    if box[2] < 0 or box[3] < 0:
        bad(where, f'"bbox" has a negative width or height: {_show(box)}')
        return None
    return float(box[2] * box[3])


def _check_segmentation(ann: dict, image: Optional[dict], where: str, bad):
    """The mask's area when it can be known without decoding, None when it cannot (or there is no
    mask), False after reporting a problem."""
    if 'segmentation' not in ann:
        bad(where, 'no "segmentation" (the masks are read from it; give the polygons or the RLE)')
        return False
    seg = ann['segmentation']
    if isinstance(seg, list):
        if not seg:
            bad(where, '"segmentation" is an empty list: give at least one polygon')
            return False
        for k, polygon in enumerate(seg):
            if not (isinstance(polygon, list) and all(map(_is_number, polygon))):
                bad(where, f'"segmentation"[{k}] must be a polygon [x1, y1, x2, y2, ...] of numbers; '
                           f'got {_show(polygon)}')
                return False
            if len(polygon) % 2 or len(polygon) < 6:
                bad(where, f'"segmentation"[{k}] has {len(polygon)} coordinates; a polygon needs at '
                           f'least 3 points (6 numbers, x and y alternating)')
                return False
        return sum(_polygon_area(p) for p in seg)
    if isinstance(seg, dict):
        return _check_rle(seg, image, where, bad)
    bad(where, f'"segmentation" must be a list of polygons or an RLE object; got {_show(seg)}')
    return False


def _check_rle(rle: dict, image: Optional[dict], where: str, bad):
    size, counts = rle.get('size'), rle.get('counts')
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(s) and s >= 0 for s in size)):
        bad(where, f'"segmentation"."size" must be [height, width]; got {_show(size)}')
        return False
    if image is not None and _is_int(image.get('height')) and _is_int(image.get('width')) \
            and size != [image['height'], image['width']]:
        bad(where, f'"segmentation"."size" {_show(size)} is not its image\'s [height, width] '
                   f'[{image["height"]}, {image["width"]}]')
        return False
    if isinstance(counts, list):  # uncompressed: alternating runs of 0 and 1, column by column
        if not all(_is_int(c) and c >= 0 for c in counts):
            bad(where, '"segmentation"."counts" must be run lengths >= 0; '
                       f'got {_show([c for c in counts if not (_is_int(c) and c >= 0)][:3])} among them')
            return False
        if sum(counts) != size[0] * size[1]:
            bad(where, f'"segmentation"."counts" add up to {sum(counts)} pixels; "size" {_show(size)} '
                       f'has {size[0] * size[1]}')
            return False
        return float(sum(counts[1::2]))
    if isinstance(counts, str):
        return _compressed_rle_area(rle, where, bad)
    bad(where, f'"segmentation"."counts" must be a list of run lengths or a compressed RLE string; '
               f'got {_show(counts)}')
    return False


def _compressed_rle_area(rle: dict, where: str, bad):
    """Area of a compressed RLE from its runs (no mask is decoded); its runs must cover the size."""
    h, w = rle['size']
    try:
        runs = _decode_counts(rle['counts'])
    except ValueError as e:
        bad(where, f'"segmentation"."counts" is not a compressed RLE string: {e}')
        return False
    if any(r < 0 for r in runs) or sum(runs) != h * w:
        bad(where, f'"segmentation"."counts" decodes to runs covering {sum(runs)} pixels '
                   f'(some negative: {any(r < 0 for r in runs)}); "size" [{h}, {w}] has {h * w}')
        return False
    return float(sum(runs[1::2]))


def _decode_counts(text: str) -> List[int]:
    """The run lengths of pycocotools' compressed RLE string (6 bits a character from '0', the
    continuation bit 0x20, the sign bit 0x10 of the last character, runs after the second are
    differences to the run two before)."""
    runs: List[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError('it ends inside a number')
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f'character {text[p]!r} at {p}')
            x |= (c & 0x1f) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _polygon_area(polygon: List[float]) -> float:
    xs, ys = polygon[0::2], polygon[1::2]
    return abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2


def _degenerate(ann: dict, image: Optional[dict], mask_area) -> Optional[str]:
    """Why a well-formed object is no training target (mmdetection's rules), or None."""
    x, y, w, h = ann['bbox']
    if w < 1 or h < 1:
        return 'box under one pixel wide or high'
    if image is not None and _is_int(image.get('width')) and _is_int(image.get('height')):
        inside_w = max(0, min(x + w, image['width']) - max(x, 0))
        inside_h = max(0, min(y + h, image['height']) - max(y, 0))
        if inside_w * inside_h == 0:
            return 'box outside its image'
    if mask_area is not None and mask_area <= 0:
        return 'mask of area 0'
    return None


def load_coco(path: str, masks: bool = True) -> CheckedCoco:
    """Read and check an instances file (see the module docstring)."""
    return check_coco(path, read_json(path), masks)
