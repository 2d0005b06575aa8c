"""Draw what a FocalNet's focal modulation learned, for any checkpoint and any image.

    python tools/visualize.py --cfg configs/focalnet_tiny_srf.yaml --checkpoint focalnet_tiny_srf.pth \
        --image cat.jpg --image street.jpg --output vis/

writes three figures into the output folder:

* ``kernels.png``: the depth-wise kernels of every focal level of one block per stage (default the
  last). Each row is one (stage, level); the first column is the mean of |w| over all channels, the
  spatial footprint of the level, and the next columns are the signed kernels of the first channels.
* ``gating_maps.png``: per image, the image the model saw next to the gate of every focal level and
  of the global context, for one block (default the last of the network). Gates are unbounded
  linear outputs, so each row shares one colour scale, shown by its colour bar.
* ``modulator.png``: per image, the image next to the modulator's magnitude (L2 norm over channels)
  laid over it, for the last block of each stage (or the blocks asked for).

Maps are upsampled bilinearly (never nearest, which gives a chessboard) over the area each feature
cell covers, then cropped to the image. The gates and the modulator come from
``FocalNet.modulation_maps``, the model's own forward pass.

The figure code is a set of pure functions (``kernel_maps``, ``modulation_arrays``, ``plot_*``,
``figure_image``) that take a model and image tensors; ``load_model``, ``prepare_images`` and
``class_names`` give them a model with its weights, images and class names. demo/app.py draws its
page with these same functions.
"""
import argparse
import functools
import io
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ''):
    # Run as a script (python tools/visualize.py): make the repository's packages importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib
matplotlib.use('Agg')  # files only; never needs a display
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from PIL import Image
from timm.data import ImageNetInfo, infer_imagenet_subset
from torchvision import transforms as T

from config import load_config
from data import build_transform
from data.files import not_regular
from data.robust import open_image
from errors import UserError
from models import FocalNet, build_model, load_pretrained
from models.pretrained import CheckpointError
from tools.loading import check_img_size, device_from_flag
from tools.outputs import check_output_folder

logger = logging.getLogger('focalnet.visualize')

BlockId = Tuple[int, int]
PANEL_INCHES = 2.0     # one image panel
KERNEL_INCHES = 0.8    # one kernel panel
DPI = 100


# ---- arrays -----------------------------------------------------------------------------------------
def resolve_block(model: FocalNet, block: BlockId) -> BlockId:
    """The model's (stage, block) for ``block`` (negative indices count from the end); a bad index is
    a user mistake here."""
    try:
        return model.resolve_block(block)
    except IndexError as e:
        raise UserError(str(e)) from None


def last_blocks(model: FocalNet) -> List[BlockId]:
    """The last block of every stage."""
    return [(s, len(stage.blocks) - 1) for s, stage in enumerate(model.layers)]


@dataclass
class KernelMap:
    stage: int
    block: int
    level: int
    weight: np.ndarray  # (C, k, k), the depth-wise kernel of every channel
    reach: int          # input pixels one context value sees through this and the lower levels

    @property
    def footprint(self) -> np.ndarray:
        """Mean |w| over channels: where in the window the level looks, whatever the sign."""
        return np.abs(self.weight).mean(0)


def kernel_maps(model: FocalNet, block_index: int = -1) -> List[KernelMap]:
    """The depth-wise kernels of each focal level of block ``block_index`` in every stage."""
    out = []
    for stage in range(len(model.layers)):
        s, b = resolve_block(model, (stage, block_index))
        modulation = model.layers[s].blocks[b].modulation
        cells = 1
        for level, layer in enumerate(modulation.focal_layers):
            # The levels are stacked convolutions, so their reaches add up: "local early, global late"
            # in input pixels is the cells covered times the stage's stride.
            weight = layer[0].weight.detach().float().cpu()[:, 0].numpy()
            cells += weight.shape[-1] - 1
            out.append(KernelMap(s, b, level, weight, cells * model.strides[s]))
    return out


def upsample(maps: torch.Tensor, image_size: Tuple[int, int], stride: int) -> torch.Tensor:
    """(N, K, h, w) feature maps to the image's (H, W), bilinearly.

    A cell of a stride-``stride`` map covers ``stride`` pixels from the top left; the patch
    convolutions drop the rows and columns that do not fill a last patch, so the maps cover
    (h * stride, w * stride), at most the image. The few pixels beyond (fewer than the stride) repeat
    the last row and column of the upsampled map.
    """
    H, W = image_size
    h, w = maps.shape[-2:]
    up = F.interpolate(maps.float(), size=(h * stride, w * stride), mode='bilinear', align_corners=False)
    pad_h, pad_w = max(0, H - h * stride), max(0, W - w * stride)
    if pad_h or pad_w:
        up = F.pad(up, (0, pad_w, 0, pad_h), mode='replicate')
    return up[..., :H, :W]


@dataclass
class ModulationArrays:
    """What the figures draw for one image batch; maps are (B, ., H, W) at the image's size."""
    logits: Optional[torch.Tensor]              # (B, num_classes); None without a classifier
    gates: Dict[BlockId, torch.Tensor]          # raw gates (B, L + 1, h, w)
    gates_up: Dict[BlockId, torch.Tensor]       # bilinearly upsampled (B, L + 1, H, W)
    magnitude: Dict[BlockId, torch.Tensor]      # |modulator| over channels (B, h, w)
    magnitude_up: Dict[BlockId, torch.Tensor]   # upsampled (B, H, W)


@torch.inference_mode()
def modulation_arrays(model: FocalNet, images: torch.Tensor,
                      blocks: Sequence[BlockId]) -> ModulationArrays:
    """Gates and modulator magnitude of ``blocks`` for a normalised (B, 3, H, W) batch."""
    blocks = [resolve_block(model, b) for b in blocks]
    logits, maps = model.modulation_maps(images, blocks=blocks)
    size = tuple(images.shape[-2:])
    gates, gates_up, magnitude, magnitude_up = {}, {}, {}, {}
    for (s, b), m in maps.items():
        stride = model.strides[s]
        gates[(s, b)] = m['gates'].float().cpu()
        gates_up[(s, b)] = upsample(gates[(s, b)], size, stride)
        magnitude[(s, b)] = m['modulator'].float().norm(dim=1).cpu()
        magnitude_up[(s, b)] = upsample(magnitude[(s, b)][:, None], size, stride)[:, 0]
    # A backbone (num_classes 0) has no classifier: what its head returns are pooled features.
    logits = logits.float().cpu() if model.num_classes > 0 else None
    return ModulationArrays(logits, gates, gates_up, magnitude, magnitude_up)


@functools.lru_cache(maxsize=4)
def class_names(num_classes: int) -> Optional[Tuple[str, ...]]:
    """Names of the ImageNet classes for a classifier of ``num_classes`` outputs (1000: ImageNet-1K,
    21842: the ImageNet-22K order of the FocalNet releases), from timm's offline lists; None for any
    other number. A name that two classes share gets its WordNet id appended."""
    subset = infer_imagenet_subset({'num_classes': num_classes})
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    names, synsets = info.label_descriptions(), info.label_names()
    counts = Counter(names)
    return tuple(f'{n} ({s})' if counts[n] > 1 else n for n, s in zip(names, synsets))


def display_image(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (3, H, W) input back to the (H, W, 3) image in [0, 1] that the model saw."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (tensor.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


# ---- figures ----------------------------------------------------------------------------------------
def figure_size(rows: int, cols: int, panel: float) -> Tuple[float, float]:
    """Inches of a grid of square panels; a tenth of a panel per row and column for titles."""
    return cols * panel * 1.1, rows * panel * 1.15


def _grid(rows: int, cols: int, panel: float) -> Tuple[Figure, np.ndarray]:
    fig = Figure(figsize=figure_size(rows, cols, panel), dpi=DPI, layout='constrained')
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _row_title(name: str, arrays: ModulationArrays, i: int,
               classes: Optional[Sequence[str]] = None) -> str:
    """The image's name and, with a classifier, the predicted class and its probability."""
    if arrays.logits is None:
        return name
    p = arrays.logits[i].softmax(-1)
    top = int(p.argmax())
    # A title has room for the first of a class's synonyms only.
    label = classes[top].split(',')[0] if classes else f'class {top}'
    return f'{name}\n{label} (p={float(p.max()):.2f})'


def figure_image(fig: Figure) -> Image.Image:
    """The figure as the RGB image that savefig writes to a PNG file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=DPI)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert('RGB')


def plot_kernels(kernels: Sequence[KernelMap], channels: int = 8, cmap: str = 'viridis',
                 signed_cmap: str = 'RdBu_r') -> Tuple[Figure, Tuple[int, int]]:
    """One row per (stage, level): the |w| footprint, then the first ``channels`` signed kernels."""
    shown = min(channels, min(k.weight.shape[0] for k in kernels))
    rows, cols = len(kernels), 1 + shown
    fig, axes = _grid(rows, cols, KERNEL_INCHES)
    for row, k in zip(axes, kernels):
        size = k.weight.shape[-1]
        row[0].imshow(k.footprint, cmap=cmap, interpolation='nearest')
        row[0].set_ylabel(f'stage {k.stage} block {k.block}\nlevel {k.level}: {size}x{size}\n'
                          f'reach {k.reach} px', fontsize=7)
        # One symmetric scale per row, so that sign and relative strength read across channels.
        limit = float(np.abs(k.weight[:shown]).max()) or 1.0
        for c in range(shown):
            row[1 + c].imshow(k.weight[c], cmap=signed_cmap, vmin=-limit, vmax=limit,
                              interpolation='nearest')
    axes[0, 0].set_title('mean |w|', fontsize=8)
    for c in range(shown):
        axes[0, 1 + c].set_title(f'ch {c}', fontsize=8)
    fig.suptitle('Depth-wise kernels per stage and focal level', fontsize=10)
    return fig, (rows, cols)


def plot_gating(images: Sequence[np.ndarray], arrays: ModulationArrays, block: BlockId,
                names: Sequence[str], cmap: str = 'viridis',
                classes: Optional[Sequence[str]] = None) -> Tuple[Figure, Tuple[int, int]]:
    """One row per image: the image, then the gate of each focal level and of the global context.
    ``classes`` names the predicted class in each row's title (else its index)."""
    gates = arrays.gates_up[block].numpy()
    levels = gates.shape[1] - 1
    rows, cols = len(images), 2 + levels
    fig, axes = _grid(rows, cols, PANEL_INCHES)
    for i, (row, image) in enumerate(zip(axes, images)):
        row[0].imshow(image)
        row[0].set_title(_row_title(names[i], arrays, i, classes), fontsize=8)
        vmin, vmax = float(gates[i].min()), float(gates[i].max())
        for g in range(levels + 1):
            im = row[1 + g].imshow(gates[i, g], cmap=cmap, vmin=vmin, vmax=vmax)
            row[1 + g].set_title(f'level {g}' if g < levels else 'global', fontsize=8)
        fig.colorbar(im, ax=list(row[1:]), shrink=0.8, pad=0.01)
    h, w = arrays.gates[block].shape[-2:]
    fig.suptitle(f'Gating maps, stage {block[0]} block {block[1]} '
                 f'({h}x{w} map, upsampled bilinearly)', fontsize=10)
    return fig, (rows, cols)


def plot_modulator(images: Sequence[np.ndarray], arrays: ModulationArrays,
                   blocks: Sequence[BlockId], names: Sequence[str], cmap: str = 'viridis',
                   alpha: float = 0.6,
                   classes: Optional[Sequence[str]] = None) -> Tuple[Figure, Tuple[int, int]]:
    """One row per image: the image, then |modulator| of each block laid over it. ``classes`` as in
    ``plot_gating``."""
    rows, cols = len(images), 1 + len(blocks)
    fig, axes = _grid(rows, cols, PANEL_INCHES)
    for i, (row, image) in enumerate(zip(axes, images)):
        row[0].imshow(image)
        row[0].set_title(_row_title(names[i], arrays, i, classes), fontsize=8)
        for j, block in enumerate(blocks):
            magnitude = arrays.magnitude_up[block][i].numpy()
            # Each panel is scaled to its own range: magnitudes differ by orders between stages.
            lo, hi = magnitude.min(), magnitude.max()
            row[1 + j].imshow(image)
            row[1 + j].imshow((magnitude - lo) / (hi - lo + 1e-12), cmap=cmap, alpha=alpha,
                              vmin=0, vmax=1)
            row[1 + j].set_title(f'stage {block[0]} block {block[1]}', fontsize=8)
    fig.suptitle('Modulator magnitude', fontsize=10)
    return fig, (rows, cols)


def render(model: FocalNet, images: torch.Tensor, display: Sequence[np.ndarray],
           names: Sequence[str], output: Path, gate_block: BlockId = (-1, -1),
           modulator_blocks: Optional[Sequence[BlockId]] = None, kernel_block: int = -1,
           channels: int = 8, cmap: str = 'viridis') -> Dict[str, Path]:
    """Write kernels.png, gating_maps.png and modulator.png for a normalised batch into ``output``."""
    model.eval()
    gate_block = resolve_block(model, gate_block)
    modulator_blocks = [resolve_block(model, b) for b in (modulator_blocks or last_blocks(model))]
    kernels = kernel_maps(model, kernel_block)
    arrays = modulation_arrays(model, images, [gate_block, *modulator_blocks])
    output.mkdir(parents=True, exist_ok=True)
    classes = class_names(model.num_classes)
    figures = {
        'kernels': plot_kernels(kernels, channels=channels, cmap=cmap)[0],
        'gating_maps': plot_gating(display, arrays, gate_block, names, cmap=cmap, classes=classes)[0],
        'modulator': plot_modulator(display, arrays, modulator_blocks, names, cmap=cmap,
                                    classes=classes)[0],
    }
    paths = {}
    for name, fig in figures.items():
        paths[name] = output / f'{name}.png'
        fig.savefig(paths[name], dpi=DPI)
    return paths


# ---- command line -----------------------------------------------------------------------------------
def load_images(paths: Sequence[str], transform) -> Tuple[torch.Tensor, List[np.ndarray]]:
    """The evaluation transform applied to each image file, and the images the model sees, for display.

    Display images undo the transform's normalisation, so they show the resized and centre-cropped
    picture the maps belong to.
    """
    for path in paths:
        problem = not_regular(path)
        if problem is not None:
            raise UserError(f'image not found: {path}' if problem == 'not found'
                            else f'--image {path} is {problem}, not an image file')
    # Decoded as in training and evaluation (any mode, EXIF orientation applied); an unreadable file
    # is a one-line error naming it.
    return prepare_images([open_image(path) for path in paths], transform)


def prepare_images(images: Sequence[Image.Image], transform) -> Tuple[torch.Tensor, List[np.ndarray]]:
    """``load_images`` for images already in memory (RGB)."""
    tensors = [transform(image) for image in images]
    sizes = {tuple(t.shape) for t in tensors}
    if len(sizes) > 1:
        raise UserError(f'the evaluation transform gives images of different sizes {sorted(sizes)}; '
                         'use a transform with a centre crop (TEST.CROP True)')
    mean, std = _normalisation(transform)
    return torch.stack(tensors), [display_image(t, mean, std) for t in tensors]


def _normalisation(transform) -> Tuple[Sequence[float], Sequence[float]]:
    """Mean and std of the transform's Normalize step; none means the tensor is the image itself."""
    for step in getattr(transform, 'transforms', [transform]):
        if isinstance(step, T.Normalize):
            return step.mean, step.std
    return (0., 0., 0.), (1., 1., 1.)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='tools/visualize.py',
        description='Draw the depth-wise kernels, gating maps and modulator of a FocalNet.')
    parser.add_argument('--cfg', required=True,
                        help='model config (YAML), e.g. configs/focalnet_tiny_srf.yaml')
    parser.add_argument('--checkpoint', help='weights in any layout models.load_pretrained reads '
                        '(official, timm, Hugging Face); default MODEL.PRETRAINED of the config, '
                        'else random weights with a warning')
    parser.add_argument('--image', action='append', required=True,
                        help='an image file; repeat for several (one figure row each)')
    parser.add_argument('--output', required=True, help='folder for the PNG figures')
    parser.add_argument('--gate-block', nargs=2, type=int, default=(-1, -1),
                        metavar=('STAGE', 'BLOCK'),
                        help='block whose gates gating_maps.png draws; negative counts from the end '
                        '(default: -1 -1, the last block)')
    parser.add_argument('--modulator-block', nargs=2, type=int, action='append',
                        metavar=('STAGE', 'BLOCK'),
                        help='block whose modulator modulator.png draws; repeat for several '
                        '(default: the last block of each stage)')
    parser.add_argument('--kernel-block', type=int, default=-1, metavar='BLOCK',
                        help='block of each stage whose kernels kernels.png draws '
                        '(default: -1, the last)')
    parser.add_argument('--channels', type=int, default=8,
                        help='channels whose signed kernels kernels.png shows (default: 8)')
    parser.add_argument('--cmap', default='viridis',
                        help='matplotlib colormap of the maps (default: viridis)')
    parser.add_argument('--img-size', type=int, help='evaluation resolution (DATA.IMG_SIZE)')
    parser.add_argument('--interpolation', choices=('bicubic', 'bilinear'),
                        help='resize interpolation (DATA.INTERPOLATION)')
    parser.add_argument('--no-crop', action='store_true',
                        help='resize to the resolution without the centre crop (TEST.CROP False)')
    parser.add_argument('--device', default='cpu', help='device to run the model on (default: cpu)')
    parser.add_argument('--opts', nargs='+', default=[], metavar='KEY VALUE',
                        help='config overrides, e.g. --opts MODEL.NUM_CLASSES 21842')
    return parser.parse_args(argv)


def config_opts(args: argparse.Namespace) -> List[str]:
    """--opts followed by the named flags, which take precedence."""
    opts = list(args.opts)
    if len(opts) % 2:
        raise UserError(f'--opts takes KEY VALUE pairs; got {len(opts)} words: {" ".join(opts)}')
    if args.img_size is not None:
        opts += ['DATA.IMG_SIZE', str(args.img_size)]
    if args.interpolation is not None:
        opts += ['DATA.INTERPOLATION', args.interpolation]
    if args.no_crop:
        opts += ['TEST.CROP', 'False']
    return opts


def build(args: argparse.Namespace):
    """Config, model with its weights, and evaluation transform from the command line."""
    config = load_config(args.cfg, config_opts(args))
    checkpoint = args.checkpoint or config.MODEL.PRETRAINED
    if checkpoint and not Path(checkpoint).exists():
        raise UserError(f'checkpoint not found: {checkpoint}')
    try:
        model, _ = load_model(config, checkpoint)
    except CheckpointError as e:
        raise UserError(f'cannot load {checkpoint}: {e}\n(--cfg and --opts must describe the '
                        'architecture of the checkpoint, MODEL.NUM_CLASSES included)') from None
    return config, model, build_transform(False, config)


def load_model(config, checkpoint: Optional[str] = None) -> Tuple[FocalNet, Optional[dict]]:
    """The config's model and, from ``checkpoint`` (any file or folder load_pretrained reads), its
    weights and load_pretrained's report; without a checkpoint, random weights seeded with SEED and
    None, with a warning. A checkpoint that cannot be read or does not fit raises CheckpointError."""
    torch.manual_seed(config.SEED)  # random weights, when no checkpoint is given, are repeatable
    model = build_model(config)
    if not checkpoint:
        logger.warning('no checkpoint given: drawing a randomly initialised %s; the maps show '
                       'nothing learned', config.MODEL.NAME or 'model')
        return model, None
    info = load_pretrained(model, checkpoint)
    logger.info('loaded %s (%s layout)', checkpoint, info['layout'])
    return model, info


def run(args: argparse.Namespace) -> Dict[str, Path]:
    if args.channels < 1:
        raise UserError(f'--channels must be at least 1, got {args.channels}')
    if args.cmap not in matplotlib.colormaps:
        raise UserError(f'unknown colormap {args.cmap!r}; see matplotlib.colormaps')
    check_img_size(args.img_size)
    device = device_from_flag(args.device)
    check_output_folder(args.output, '--output')  # before the model is built and run
    _, model, transform = build(args)
    model = model.to(device).eval()
    images, display = load_images(args.image, transform)
    names = [Path(p).name for p in args.image]
    blocks = [tuple(b) for b in args.modulator_block] if args.modulator_block else None
    paths = render(model, images.to(device), display, names, Path(args.output),
                   gate_block=tuple(args.gate_block), modulator_blocks=blocks,
                   kernel_block=args.kernel_block, channels=args.channels, cmap=args.cmap)
    for path in paths.values():
        logger.info('wrote %s', path)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    args = parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f'tools/visualize.py: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
