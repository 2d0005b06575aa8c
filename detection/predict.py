"""Detect objects in image files, folders and glob patterns with a trained detector, and draw them.

    python -m detection.predict --checkpoint output/mask_rcnn_shapes/default/ckpt_epoch_7.pth \
        photos/ 'more/*.jpg' --output-dir predictions

Writes ``<output-dir>/<image name>.jpg`` (boxes, "class score" labels and masks drawn over the image),
``results.json`` (the detections in COCO's results format: [x, y, w, h] boxes, category ids, RLE
masks) and ``images.json`` (COCO's "images" entries: which file each image_id is). A checkpoint of
``python -m detection`` carries its config, category ids and names; a file without a config needs
``--cfg``. Mistakes in the command exit with status 2 and one line.
"""
import argparse
import json
import logging
import sys
from typing import List, Optional, Sequence

import torch

from data.dataset_classes import COCO_CLASSES
from errors import UserError
from models.cost import count_params
from tools.dense_predict import (run_command, OBJECT_COLOURS, ShowDir, checkpoint_config, collect_inputs, draw_detections,
                                 output_folder, output_names, read_image)
from tools.loading import device_from_flag
from engine.resume import load_checkpoint

from .evaluation import to_coco_results
from .model import build_detector

logger = logging.getLogger('focalnet.predict')

# The category ids of COCO's 80 classes (1..90 with gaps), for a checkpoint that does not list its own.
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def categories_of(ckpt: dict, num_classes: int):
    """(category id per label 1..K, name per label): what the checkpoint lists, else COCO's for 80
    classes, else ids 1..K named 'class <id>'."""
    ids = ckpt.get('categories')
    names = ckpt.get('category_names')
    if ids is None:
        ids = COCO_IDS if num_classes == 80 else list(range(1, num_classes + 1))
    if names is None:
        names = list(COCO_CLASSES) if num_classes == 80 else [f'class {i}' for i in ids]
    if len(ids) != num_classes or len(names) != num_classes:
        raise UserError(f'the checkpoint lists {len(ids)} categories; its detector has {num_classes} classes')
    return [int(i) for i in ids], [str(n) for n in names]


def load_detector(checkpoint: str, cfg: Optional[str], opts: Sequence[str], device: torch.device):
    """(config, detector in eval mode, category ids, names) from a ``python -m detection`` checkpoint."""
    config, ckpt = checkpoint_config(checkpoint, cfg, opts)
    if 'model' not in ckpt:
        raise UserError(f'{checkpoint} is not a checkpoint of python -m detection (no "model" entry)')
    num_classes = len(ckpt['categories']) if 'categories' in ckpt else config.MODEL.NUM_CLASSES
    torch.manual_seed(config.SEED)
    try:
        model = build_detector(config, num_classes)
    except (ValueError, TypeError) as e:
        raise UserError(f'the config does not describe a valid detector: {e}') from None
    load_checkpoint(checkpoint, model=model, ckpt=ckpt)
    ids, names = categories_of(ckpt, num_classes)
    return config, model.to(device).eval(), ids, names


def validation_drawer(folder: str, coco_gt, names: Sequence[str], score_thresh: float = 0.3):
    """``--eval --show-dir``: a function of (image, target, output) that saves the validation image
    with the detections scoring ``score_thresh`` or more drawn, under its own file name."""
    show = ShowDir(folder)

    def draw(image: torch.Tensor, target: dict, output: dict):
        pixels = (image.float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
        name = coco_gt.imgs[int(target['image_id'])]['file_name']
        show.save(name, draw_detections(pixels, {k: v.cpu() for k, v in output.items()}, names, OBJECT_COLOURS,
                                        score_thresh))
    draw.show = show
    return draw


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser('python -m detection.predict', description=__doc__.splitlines()[0])
    p.add_argument('images', nargs='+', help='image files, folders (searched recursively) and glob '
                   'patterns (quoted, e.g. "shots/**/*.jpg")')
    p.add_argument('--checkpoint', required=True, help='a checkpoint of python -m detection')
    p.add_argument('--cfg', help='config file; default: the one stored in the checkpoint')
    p.add_argument('--opts', nargs='+', default=[], metavar='KEY VALUE', help='config overrides')
    p.add_argument('--output-dir', required=True, help='folder for the drawn images and results.json')
    p.add_argument('--score-thresh', type=float, default=0.3,
                   help='draw detections scoring at least this (default 0.3); results.json keeps all')
    p.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    return p.parse_args(argv)


@torch.inference_mode()
def run(args) -> List[dict]:
    if not 0 <= args.score_thresh <= 1:
        raise UserError(f'--score-thresh must be between 0 and 1; got {args.score_thresh}')
    device = device_from_flag(args.device)
    paths = collect_inputs(args.images)
    folder = output_folder(args.output_dir)
    config, model, ids, names = load_detector(args.checkpoint, args.cfg, args.opts, device)
    logger.info('%s: %s, %.2fM parameters, %d categories; %d images', args.checkpoint, config.MODEL.NAME,
                count_params(model) / 1e6, len(ids), len(paths))
    results, images = [], []
    for image_id, (path, name) in enumerate(zip(paths, output_names(paths)), 1):
        image = read_image(path)
        output = {k: v.cpu() for k, v in model([image.to(device).float() / 255])[0].items()}
        draw_detections(image, output, names, OBJECT_COLOURS, args.score_thresh).save(folder / f'{name}.jpg', quality=92)
        results += to_coco_results(image_id, output, ids)
        images.append({'id': image_id, 'file_name': str(path), 'width': image.shape[2], 'height': image.shape[1]})
        shown = int((output['scores'] >= args.score_thresh).sum())
        print(f'{path}: {shown} detections of score >= {args.score_thresh:g} -> {folder / (name + ".jpg")}')
    (folder / 'results.json').write_text(json.dumps(results))
    (folder / 'images.json').write_text(json.dumps(images, indent=1))
    print(f'{len(results)} detections of {len(paths)} images in {folder / "results.json"} '
          f'(image ids: {folder / "images.json"})')
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command('python -m detection.predict', lambda: run(args))


if __name__ == '__main__':
    sys.exit(main())
