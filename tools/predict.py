"""Top-k predictions of a FocalNet for image files, folders and glob patterns.

    python tools/predict.py --model focalnet_tiny_srf --checkpoint focalnet_tiny_srf.pth \
        cat.jpg holiday/ 'scans/**/*.png' --topk 5 --json predictions.json

Images go through the config's evaluation transform (data/transforms.py; 256/224 resize and centre
crop at the config's resolution), in batches. Class names come from timm's offline copy of the
ImageNet label lists: ImageNet-1K for 1000 classes, the 21842-class order of the ImageNet-22K
releases (timm's 'imagenet-22k-ms', the official label map) for 21842; ``--labels FILE`` names the
classes of other models, one per line. Folders are searched recursively for image files, with a
progress bar. An image that cannot be read is reported with the reason and skipped; the others are
still predicted, and the exit status is 1. Mistakes in the command exit with status 2.
"""
import argparse
import csv
import glob
import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ''):
    # Run as a script (python tools/predict.py): make the repository's packages importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data import build_transform
from data.files import not_regular, open_regular
from errors import UserError

logger = logging.getLogger('focalnet.predict')

# Extensions searched for in folders (torchvision's ImageFolder list); files named on the command
# line are tried whatever their extension.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
SUBSETS = ('imagenet-1k', 'imagenet-22k-ms', 'imagenet-22k')
# A file of class names larger than this is not one (ImageNet-22K's names take 0.4 MB).
MAX_LABELS_BYTES = 16 * 2 ** 20


# ---- inputs -----------------------------------------------------------------------------------------

def _images_in(folder: Path, passed_over: List[str]) -> List[Path]:
    images = []
    for p in sorted(folder.rglob('*')):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or p.is_dir():
            continue
        problem = not_regular(str(p))
        (passed_over.append(f'{p} ({problem})') if problem else images.append(p))
    return images


def collect_images(inputs: Sequence[str]) -> Tuple[List[Path], bool]:
    """(image files, whether a folder or pattern was given) for files, folders and glob patterns.
    A FIFO, socket or device (which would block or never end when read) is never opened: named on
    the command line it is an error; found in a folder or by a pattern it is passed over, with a
    warning naming it."""
    found: List[Path] = []
    passed_over: List[str] = []
    searched = False
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            searched = True
            images = _images_in(path, passed_over)
            if not images:
                logger.warning('%s: no image files (%s) in this folder', item, ', '.join(IMAGE_EXTENSIONS))
            found += images
        elif path.is_file():
            found.append(path)
        elif os.path.lexists(path):
            raise UserError(f'{item} is {not_regular(item)}, not an image file')
        elif glob.has_magic(item):
            searched = True
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
            if not matches:
                raise UserError(f'no file matches {item}')
            for match in matches:
                if match.is_dir():
                    found += _images_in(match, passed_over)
                elif not_regular(str(match)):
                    passed_over.append(f'{match} ({not_regular(str(match))})')
                else:
                    found.append(match)
        else:
            raise UserError(f'image file or folder not found: {item}')
    if passed_over:
        shown = ', '.join(passed_over[:10]) + (f' and {len(passed_over) - 10} more' if len(passed_over) > 10 else '')
        logger.warning('passing over %d name(s) that are not regular files: %s', len(passed_over), shown)
    unique = list(dict.fromkeys(found))
    if not unique:
        raise UserError(f'no images to predict in {" ".join(inputs)}')
    return unique, searched


class ImageFiles(Dataset):
    """(index, transformed image or None, error message) for each file."""

    def __init__(self, paths: Sequence[Path], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            # open_regular: a file replaced by a FIFO since it was listed fails instead of blocking.
            with open_regular(str(self.paths[index])) as f, Image.open(f) as image:
                image = image.convert('RGB')  # decodes the whole file: truncation shows here
            return index, self.transform(image), ''
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else f'{type(e).__name__}: {e}'
            return index, None, reason


def _collate(items):
    good = [(i, t) for i, t, _ in items if t is not None]
    errors = [(i, e) for i, t, e in items if t is None]
    images = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], images, errors


# ---- class names ------------------------------------------------------------------------------------

def class_names(num_classes: int, labels: str = 'auto') -> Tuple[Optional[List[Tuple[str, str]]], str]:
    """((label, description) per class, or None; where they come from)."""
    if labels == 'none':
        return None, 'none'
    auto = labels == 'auto'
    if auto:
        from timm.data import infer_imagenet_subset
        labels = infer_imagenet_subset({'num_classes': num_classes})
        if labels is None:
            logger.warning('no class names known for %d classes (give --labels FILE); classes are '
                           'shown by index', num_classes)
            return None, 'none'
    if auto or labels in SUBSETS:
        from timm.data import ImageNetInfo
        info = ImageNetInfo(labels)
        if info.num_classes() != num_classes:
            raise UserError(f'--labels {labels} names {info.num_classes()} classes; the model has '
                            f'{num_classes}')
        return list(zip(info.label_names(), info.label_descriptions())), labels
    path = Path(labels)
    if not os.path.lexists(path):
        raise UserError(f'--labels must be auto, none, {", ".join(SUBSETS)} or a file with one class '
                        f'name per line; {labels} is none of these')
    names = read_names(labels)
    if len(names) != num_classes:
        raise UserError(f'{labels} holds {len(names)} class names; the model has {num_classes} classes')
    return [(name, name) for name in names], str(path)


def read_names(path: str) -> List[str]:
    """The non-empty lines of a class-name file: UTF-8 text, a regular file."""
    problem = not_regular(path)
    if problem is not None:
        raise UserError(f'--labels {path} is {problem}, not a file of class names')
    try:
        with open_regular(path) as f:
            data = f.read(MAX_LABELS_BYTES + 1)
    except OSError as e:
        raise UserError(f'--labels {path}: cannot read it: {e.strerror or e}') from None
    if len(data) > MAX_LABELS_BYTES:
        raise UserError(f'--labels {path} is over {MAX_LABELS_BYTES // 2 ** 20} MB; a file of class names '
                        f'is a few hundred kilobytes even for 22K classes')
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise UserError(f'--labels {path} is not a text file of class names (not UTF-8 at byte '
                        f'{e.start})') from None
    if '\x00' in text:
        raise UserError(f'--labels {path} is not a text file of class names (it holds NUL bytes)')
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---- prediction -------------------------------------------------------------------------------------

def predict(model: torch.nn.Module, paths: Sequence[Path], transform, topk: int = 5,
            batch_size: int = 16, workers: int = 0, device: str = 'cpu',
            names: Optional[List[Tuple[str, str]]] = None,
            progress: bool = False) -> Tuple[List[dict], List[dict]]:
    """(results, errors): for each readable image its top-k classes with probabilities, in input
    order; for each unreadable one the reason."""
    from tqdm import tqdm
    loader = DataLoader(ImageFiles(paths, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate)
    results: Dict[int, dict] = {}
    errors: List[dict] = []
    bar = tqdm(total=len(paths), unit='img', desc='predicting', file=sys.stderr, disable=not progress)
    model = model.to(device).eval()
    with bar, torch.inference_mode():
        for indices, images, failed in loader:
            errors += [{'image': str(paths[i]), 'error': e} for i, e in failed]
            if images is not None:
                probs = model(images.to(device)).float().softmax(-1)
                top = probs.topk(min(topk, probs.shape[-1]), dim=-1)
                for row, i in enumerate(indices):
                    results[i] = {'image': str(paths[i]), 'predictions': [
                        _prediction(rank, int(c), float(p), names)
                        for rank, (p, c) in enumerate(zip(top.values[row], top.indices[row]), 1)]}
            bar.update(len(indices) + len(failed))
    return [results[i] for i in sorted(results)], errors


def _prediction(rank: int, index: int, probability: float, names) -> dict:
    label, name = names[index] if names else (str(index), '')
    return {'rank': rank, 'class': index, 'label': label, 'name': name, 'probability': probability}


# ---- output -----------------------------------------------------------------------------------------

def format_table(results: Sequence[dict]) -> str:
    lines = []
    for result in results:
        lines.append(result['image'])
        for p in result['predictions']:
            label = p['label'] if p['name'] in ('', p['label']) else f'{p["label"]}  {p["name"]}'
            lines.append(f'  {p["rank"]:>2}  {100 * p["probability"]:6.2f}%  {p["class"]:>5}  {label}')
    return '\n'.join(lines)


def write_csv(results: Sequence[dict], stream):
    writer = csv.writer(stream)
    writer.writerow(['image', 'rank', 'class', 'label', 'name', 'probability'])
    for result in results:
        for p in result['predictions']:
            writer.writerow([result['image'], p['rank'], p['class'], p['label'], p['name'],
                             f'{p["probability"]:.6g}'])


def _write(target: str, write):
    if target == '-':
        write(sys.stdout)
        return
    try:
        with open(target, 'w', newline='') as f:
            write(f)
    except OSError as e:  # checked before the work; a disk can still fill up since
        raise UserError(f'cannot write {target}: {e.strerror or e}') from None


# ---- command line -----------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='tools/predict.py',
        description='Top-k predictions of a FocalNet for image files, folders and glob patterns.')
    parser.add_argument('images', nargs='+', help='image files, folders (searched recursively) and '
                        'glob patterns (quote them, e.g. "shots/**/*.jpg")')
    parser.add_argument('--model', help='a release name (its config in configs/), e.g. focalnet_tiny_srf')
    parser.add_argument('--cfg', help='a config file instead of --model')
    parser.add_argument('--checkpoint', help='weights in any layout models.load_pretrained reads '
                        '(official, timm, Hugging Face); the number of classes follows the file')
    parser.add_argument('--topk', type=int, default=5, help='classes per image (default 5)')
    parser.add_argument('--labels', default='auto',
                        help='class names: auto (ImageNet-1K or -22K from the number of classes), '
                        f'none, {", ".join(SUBSETS)}, or a file with one name per line')
    parser.add_argument('--batch-size', type=int, default=16, help='images per batch (default 16)')
    parser.add_argument('--workers', type=int, default=2, help='image-reading processes (default 2)')
    parser.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    parser.add_argument('--img-size', type=int, help='evaluation resolution (DATA.IMG_SIZE)')
    parser.add_argument('--json', metavar='PATH', help='write the predictions as JSON (- for stdout)')
    parser.add_argument('--csv', metavar='PATH', help='write the predictions as CSV (- for stdout)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    parser.add_argument('--opts', nargs='+', default=[], metavar='KEY VALUE',
                        help='config overrides, e.g. --opts TEST.CROP False')
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Tuple[List[dict], List[dict]]:
    from tools.loading import check_img_size, device_from_flag, load_model, opts_from_flags
    from tools.outputs import check_output_file
    for flag in ('topk', 'batch_size'):
        if getattr(args, flag) < 1:
            raise UserError(f'--{flag.replace("_", "-")} must be positive; got {getattr(args, flag)}')
    if args.workers < 0:
        raise UserError(f'--workers must be 0 or more; got {args.workers}')
    check_img_size(args.img_size)
    if args.json == '-' and args.csv == '-':
        raise UserError('--json - and --csv - cannot both write to stdout')
    # Where the results go is checked before any image is read: nothing computed is lost to a typo.
    for flag in ('json', 'csv'):
        if getattr(args, flag):
            check_output_file(getattr(args, flag), f'--{flag}')
    device_from_flag(args.device)  # a bad --device is named before anything is read
    paths, searched = collect_images(args.images)
    config, model, _ = load_model(args.cfg, args.model, args.checkpoint,
                                  opts_from_flags(args.opts, args.img_size))
    if model.num_classes == 0:
        raise UserError(f'{args.checkpoint}: a backbone-only checkpoint (no classifier) cannot '
                        f'predict classes')
    names, source = class_names(model.num_classes, args.labels)
    logger.info('%d images, %s, %d classes (names: %s)', len(paths), config.MODEL.NAME,
                model.num_classes, source)
    results, errors = predict(model, paths, build_transform(False, config), args.topk, args.batch_size,
                              args.workers, args.device, names, progress=searched and not args.no_progress)
    if args.json:
        document = {'model': config.MODEL.NAME, 'checkpoint': args.checkpoint, 'labels': source,
                    'results': results, 'errors': errors}
        _write(args.json, lambda f: f.write(json.dumps(document, indent=1) + '\n'))
    if args.csv:
        _write(args.csv, lambda f: write_csv(results, f))
    if '-' not in (args.json, args.csv) and results:
        print(format_table(results))
    if errors:
        print(f'could not read {len(errors)} of {len(paths)} images:', file=sys.stderr)
        for e in errors:
            print(f'  {e["image"]}: {e["error"]}', file=sys.stderr)
    return results, errors


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')
    logging.getLogger('focalnet').setLevel(logging.INFO)
    args = parse_args(argv)
    try:
        _, errors = run(args)
    except UserError as e:
        print(f'tools/predict.py: error: {e}', file=sys.stderr)
        return 2
    return 1 if errors else 0


if __name__ == '__main__':
    sys.exit(main())
