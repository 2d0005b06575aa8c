"""What ``python -m detection.predict`` and ``python -m segmentation.predict`` share: the input
images (files, folders, glob patterns; nothing but regular files), the config of a checkpoint, the
drawings (torchvision's draw_bounding_boxes and draw_segmentation_masks) and the output folder.
``--eval --show-dir`` of both tasks draws with the same functions."""
import logging
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from config import load_config
from data.files import not_regular
from errors import UserError
from tools.predict import collect_images
from engine.checkpoint import read_checkpoint

def run_command(prog: str, run: Callable[[], object]) -> int:
    """A predict command's exit status: 0, or 2 with one line naming the mistake (no traceback)."""
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        run()
    except UserError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    return 0


# ---- inputs -----------------------------------------------------------------------------------------


def _refuse_special(path: Path):
    """Only regular files are read: a FIFO or a device would block, or never end."""
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            return
    except OSError:
        return  # collect_images names what does not exist
    kind = not_regular(str(path))
    if kind:
        raise UserError(f'{path} is {kind}, not a regular file or folder: give image files')


def collect_inputs(items: Sequence[str]) -> List[Path]:
    """The image files that ``items`` (files, folders searched recursively, glob patterns) name."""
    for item in items:
        _refuse_special(Path(item))
    paths, _ = collect_images(items)
    for path in paths:
        _refuse_special(path)
    return paths


def read_image(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB; a file that is not a readable image is a one-line error."""
    try:
        with Image.open(path) as image:
            pixels = np.array(image.convert('RGB'))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f'cannot read {path} as an image: {type(e).__name__}: {e}') from None
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def output_names(paths: Sequence[Path]) -> List[str]:
    """A distinct file stem per input: its own, with a number appended where two inputs share one."""
    seen: Dict[str, int] = {}
    names = []
    for path in paths:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f'{stem}_{seen[stem]}')
    return names


def output_folder(path: str) -> Path:
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f'--output-dir {path} is a file, not a folder')
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create --output-dir {path}: {e.strerror}') from None
    return folder


# ---- the model's config -----------------------------------------------------------------------------


def checkpoint_config(checkpoint: str, cfg: Optional[str], opts: Sequence[str]):
    """(config, checkpoint contents). The config is ``--cfg`` when given, else the one a training run
    stored in its checkpoint; ``--opts`` apply on top of either."""
    if not Path(checkpoint).is_file():
        raise UserError(f'checkpoint not found: {checkpoint}')
    _refuse_special(Path(checkpoint))
    ckpt = read_checkpoint(checkpoint, mmap=True)
    opts = list(opts) + ['MODEL.RESUME', '', 'MODEL.PRETRAINED', '']
    if cfg:
        return load_config(cfg, opts), ckpt
    stored = ckpt.get('config') if isinstance(ckpt, dict) else None
    if not isinstance(stored, str):
        raise UserError(f'{checkpoint} holds no config (a released file?): give the config it was '
                        f'trained with, --cfg configs/...yaml')
    with tempfile.NamedTemporaryFile('w', suffix='.yaml', delete=False) as f:
        f.write(stored)
    try:
        return load_config(f.name, opts), ckpt
    finally:
        os.unlink(f.name)


# ---- drawing ----------------------------------------------------------------------------------------

# Object colours, one per class in turn: saturated and far apart, so that boxes read on any photo.
OBJECT_COLOURS = np.array([(255, 56, 56), (56, 200, 255), (255, 210, 0), (200, 70, 255), (60, 230, 90),
                           (255, 130, 30), (0, 150, 255), (255, 80, 200), (160, 255, 60), (0, 220, 190)],
                          dtype=np.uint8)


def colour(index: int, palette: np.ndarray) -> tuple:
    return tuple(int(v) for v in palette[index % len(palette)])


def draw_detections(image: torch.Tensor, output: Dict[str, torch.Tensor], names: Sequence[str],
                    palette: np.ndarray, score_thresh: float = 0.0) -> Image.Image:
    """``image`` (3, H, W) uint8 with the detections of ``output`` (torchvision's: boxes x1y1x2y2,
    labels 1..K, scores, optionally masks (N, 1, H, W) probabilities) scoring ``score_thresh`` or
    more: masks filled (binarised at 0.5), boxes outlined and labelled "name score" in their class's
    colour."""
    keep = output['scores'] >= score_thresh
    labels = output['labels'][keep].tolist()
    colours = [colour(label - 1, palette) for label in labels]
    drawn = image
    if 'masks' in output and keep.any():
        masks = output['masks'][keep][:, 0] > 0.5
        drawn = draw_segmentation_masks(drawn, masks, alpha=0.45, colors=colours)
    if keep.any():
        text = [f'{names[label - 1]} {score:.2f}' for label, score in zip(labels, output['scores'][keep].tolist())]
        drawn = draw_bounding_boxes(drawn, output['boxes'][keep].float(), text, colors=colours, width=2)
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def draw_segmentation(image: torch.Tensor, pred: torch.Tensor, palette: np.ndarray,
                      alpha: float = 0.5) -> Image.Image:
    """``image`` (3, H, W) uint8 with every class of ``pred`` (H, W) filled in its palette colour."""
    present = torch.unique(pred).tolist()
    masks = torch.stack([pred == c for c in present])
    drawn = draw_segmentation_masks(image, masks, alpha=alpha, colors=[colour(c, palette) for c in present])
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def palette_png(pred: torch.Tensor, palette: np.ndarray) -> Image.Image:
    """The class indices (H, W) as an 8-bit palette PNG: pixel value k is class k, shown in its colour."""
    if len(palette) > 256:
        raise UserError(f'a palette PNG holds at most 256 classes; the model has {len(palette)}')
    png = Image.fromarray(pred.to(torch.uint8).cpu().numpy(), mode='P')
    png.putpalette(palette.astype(np.uint8).ravel().tolist())
    return png


class ShowDir:
    """Where ``--eval --show-dir`` puts the drawn validation images: ``save(name, image)`` writes
    ``<folder>/<name>.jpg``."""

    def __init__(self, folder: str):
        self.folder = output_folder(folder)
        self.count = 0

    def save(self, name: str, image: Image.Image):
        image.save(self.folder / f'{Path(name).stem}.jpg', quality=92)
        self.count += 1
