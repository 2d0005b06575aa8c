"""Segment image files, folders and glob patterns with a trained or released UPerNet, and draw it.

    python -m segmentation.predict --checkpoint output/upernet_shapes/default/ckpt_iter_200.pth \
        photos/ 'more/*.jpg' --output-dir segmented
    python -m segmentation.predict --cfg configs/segmentation/upernet_focalnet_tiny_srf_160k.yaml \
        --checkpoint upernet_focalnet_tiny_srf.pth photos/ --output-dir segmented

Writes ``<output-dir>/<image name>.png``, the predicted classes as an 8-bit palette PNG (pixel value k
is class k, in ADE20K's colours), and ``<image name>_overlay.jpg``, the classes laid over the image.
A checkpoint of ``python -m segmentation`` carries its config; a released file needs ``--cfg``. The
test-time options (scale, whole or slide, --aug-test) are the config's, as in ``--eval``.
"""
import argparse
import logging
import sys
from collections import Counter
from typing import List, Optional, Sequence

import torch

from errors import UserError
from models.pretrained import CheckpointError
from tools.dense_predict import (run_command, ShowDir, checkpoint_config, collect_inputs, draw_segmentation, output_folder,
                                 output_names, palette_png, read_image)
from tools.loading import device_from_flag

from .checkpoint import load_segmentor_weights
from .classes import class_names, palette
from .inference import predict
from .model import build_segmentor

logger = logging.getLogger('focalnet.predict')


def load_segmentor(checkpoint: str, cfg: Optional[str], opts: Sequence[str], device: torch.device):
    """(config, segmentor in eval mode) from a training checkpoint (its stored config) or a released
    file (with ``cfg``)."""
    config, _ = checkpoint_config(checkpoint, cfg, opts)
    class_names(config)  # a SEG.CLASS_NAMES that does not fit is named before the model is built
    try:
        model = build_segmentor(config)
    except (ValueError, TypeError) as e:
        raise UserError(f'the config does not describe a valid segmentor: {e}') from None
    try:
        load_segmentor_weights(model, checkpoint)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    return config, model.to(device).eval()


def validation_drawer(folder: str, config):
    """``--eval --show-dir``: a function of (image, prediction, label path) that saves the image with
    its predicted classes laid over it, under the name of its label map."""
    show = ShowDir(folder)
    colours = palette(config.MODEL.NUM_CLASSES)

    def draw(image: torch.Tensor, pred: torch.Tensor, label_path: str):
        show.save(label_path, draw_segmentation(image.cpu(), pred.cpu(), colours))
    draw.show = show
    return draw


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser('python -m segmentation.predict', description=__doc__.splitlines()[0])
    p.add_argument('images', nargs='+', help='image files, folders (searched recursively) and glob '
                   'patterns (quoted, e.g. "shots/**/*.jpg")')
    p.add_argument('--checkpoint', required=True, help='a checkpoint of python -m segmentation, or a '
                   'released UPerNet file (with --cfg)')
    p.add_argument('--cfg', help='config file; default: the one stored in the checkpoint')
    p.add_argument('--opts', nargs='+', default=[], metavar='KEY VALUE', help='config overrides')
    p.add_argument('--output-dir', required=True, help='folder for the palette PNGs and overlays')
    p.add_argument('--aug-test', action='store_true', help='multi-scale and flip testing (SEG.TEST.AUG_RATIOS)')
    p.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    return p.parse_args(argv)


@torch.inference_mode()
def run(args) -> List[dict]:
    from .train import inference_options
    device = device_from_flag(args.device)
    paths = collect_inputs(args.images)
    folder = output_folder(args.output_dir)
    config, model = load_segmentor(args.checkpoint, args.cfg, args.opts, device)
    names, colours = class_names(config), palette(config.MODEL.NUM_CLASSES)
    options = inference_options(config, args.aug_test)
    logger.info('%s: %s, %d classes; %d images (scales %s, flip %s, %s)', args.checkpoint, config.MODEL.NAME,
                len(names), len(paths), options['ratios'], options['flip'], options['mode'])
    summary = []
    for path, name in zip(paths, output_names(paths)):
        image = read_image(path)
        pred = predict(model, image[None].to(device), **options)[0].cpu()
        palette_png(pred, colours).save(folder / f'{name}.png')
        draw_segmentation(image, pred, colours).save(folder / f'{name}_overlay.jpg', quality=92)
        counts = Counter(pred.flatten().tolist())
        shares = {names[c]: n / pred.numel() for c, n in counts.most_common()}
        summary.append({'image': str(path), 'classes': shares})
        print(f'{path}: ' + ', '.join(f'{k} {100 * v:.0f}%' for k, v in list(shares.items())[:5])
              + f' -> {folder / (name + ".png")}')
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command('python -m segmentation.predict', lambda: run(args))


if __name__ == '__main__':
    sys.exit(main())
