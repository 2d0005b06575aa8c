"""The ADE20K layout, an endless resumable stream of training batches, and the validation loader.

Layout (ADEChallengeData2016, and any data set written the same way)::

    <root>/images/training/<name>.jpg        <root>/annotations/training/<name>.png
    <root>/images/validation/<name>.jpg      <root>/annotations/validation/<name>.png

Label maps are single-channel PNGs (8-bit grayscale or palette) of class indices. With
``reduce_zero_label`` (ADE20K) 0 means "other" and is ignored, and classes 1..N become 0..N-1;
without it the files hold 0..N-1 directly. 255 is ignored either way.

Damaged files are handled as for classification (data/robust.py): the first one stops the run naming
it, or, with DATA.SKIP_CORRUPT, it is skipped and reported. A label map that is not one (colour pixels,
another size than its image) counts as damaged.
"""
import logging
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors

from data.files import check_pixels, not_regular, open_regular
from data.images import upright_size
from data.robust import (CorruptImageError, DataError, SkipReportingLoader, collate_with_problems,
                         open_image)
from data.workers import worker_count
from engine.seed import seed_worker
from models.state_fit import listing
from utils import get_rank, get_world_size

from .transforms import IGNORE_INDEX

logger = logging.getLogger('focalnet')

SPLITS = {'train': 'training', 'val': 'validation'}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def open_label(path: str) -> np.ndarray:
    """A label map as an (H, W) uint8 array of class indices. A file that is not one (a colour image,
    a damaged file, a FIFO, one of more than data.files.MAX_PIXELS pixels) is reported like a damaged
    image, naming it and why."""
    try:
        with open_regular(path) as f, Image.open(f) as img:
            too_large = check_pixels(img, path, 'label map')
            if too_large:
                raise CorruptImageError(path, too_large)
            img.load()
            mode = img.mode
            label = np.array(img)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise CorruptImageError(path, reason) from None
    if mode not in LABEL_MODES:
        raise CorruptImageError(path, _label_mode_problem(mode))
    return label


LABEL_MODES = ('L', 'P')


def _label_mode_problem(mode: str) -> str:
    return (f'a label map must hold one class index per pixel (an 8-bit grayscale or palette PNG, as in '
            f'ADEChallengeData2016), not {mode} pixels')


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 (other) -> 255 (ignored), 1..N -> 0..N-1, 255 stays 255."""
    out = label.astype(np.int16) - 1
    out[(label == 0) | (label == 255)] = IGNORE_INDEX
    return out.astype(np.uint8)


def list_pairs(root: str, split: str) -> List[Tuple[str, str]]:
    """(image, label map) paths of ``split`` ('train' or 'val'), sorted by name. Names with an image
    extension that are not regular files (FIFOs, devices, folders) are passed over with a warning; an
    image without its label map, or a label map that is not a regular file, is an error naming it."""
    if not os.path.isdir(root):
        raise DataError(f'data folder not found: {root} (expected images/{{training,validation}} and '
                        f'annotations/{{training,validation}} under it, as ADEChallengeData2016)')
    image_dir = os.path.join(root, 'images', SPLITS[split])
    label_dir = os.path.join(root, 'annotations', SPLITS[split])
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            raise DataError(f'{folder} not found; an ADE20K-layout data set has images/{SPLITS[split]} '
                            f'and annotations/{SPLITS[split]} under {root}')
    names, passed_over = [], []
    for name in sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS)):
        problem = not_regular(os.path.join(image_dir, name))
        (passed_over.append(f'{name} ({problem})') if problem else names.append(name))
    if passed_over:
        logger.warning(f'{image_dir}: passing over {len(passed_over)} name(s) with an image extension that '
                       f'are not regular files: {listing(passed_over)}')
    if not names:
        raise DataError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {image_dir}')
    pairs = [(os.path.join(image_dir, n), os.path.join(label_dir, os.path.splitext(n)[0] + '.png'))
             for n in names]
    unusable = [(label, not_regular(label)) for _, label in pairs]
    unusable = [f'{label} ({"missing" if problem == "not found" else problem})'
                for label, problem in unusable if problem]
    if unusable:
        raise DataError(f'{len(unusable)} image(s) of {image_dir} have no readable label map: '
                        f'{listing(unusable, 3)}')
    labelled = {os.path.splitext(n)[0] for n in names}
    orphans = sorted(f for f in os.listdir(label_dir) if f.endswith('.png') and f[:-4] not in labelled)
    if orphans:
        logger.warning(f'{label_dir}: {len(orphans)} label map(s) without an image in {image_dir} are '
                       f'not used: {listing(orphans)}')
    return pairs


def pair_problem(image_path: str, label_path: str) -> Optional[Tuple[str, str]]:
    """(path, reason) of what makes a pair unusable, read from the two files' headers only (no pixel
    is decoded): an unreadable header, too many pixels, a label map that is not single-channel, sizes
    that differ. None for a pair that passes."""
    sizes = []
    for path, what in ((image_path, 'image'), (label_path, 'label map')):
        try:
            with open_regular(path) as f, Image.open(f) as img:
                sizes.append(upright_size(img) if what == 'image' else img.size)
                problem = check_pixels(img, path, what)
                if problem is None and what == 'label map' and img.mode not in LABEL_MODES:
                    problem = _label_mode_problem(img.mode)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            problem = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        if problem:
            return path, problem
    (iw, ih), (lw, lh) = sizes
    if (iw, ih) != (lw, lh):
        return label_path, f'the label map is {lw}x{lh} but its image {image_path} is {iw}x{ih}'
    return None


def check_pairs(pairs: List[Tuple[str, str]], skip_corrupt: bool, where: str) -> List[Tuple[str, str]]:
    """The pairs whose headers pass :func:`pair_problem`, checked before any work. A failing pair
    stops the run, naming the file and the problem (with the number of others), unless
    ``skip_corrupt``: then it is left out and counted in the log."""
    kept, problems = [], []
    for image_path, label_path in pairs:
        problem = pair_problem(image_path, label_path)
        (problems.append(problem) if problem else kept.append((image_path, label_path)))
    if problems and not skip_corrupt:
        others = f' ({len(problems) - 1} other pair(s) fail too)' if len(problems) > 1 else ''
        raise CorruptImageError(*problems[0], hint=f'{others} (set DATA.SKIP_CORRUPT True to skip such pairs)')
    if problems:
        logger.warning(f'{where}: leaving out {len(problems)} of {len(pairs)} image/label pair(s) that '
                       f'cannot be used: ' + '; '.join(f'{p}: {r}' for p, r in problems[:5])
                       + (f' and {len(problems) - 5} more' if len(problems) > 5 else ''))
    if not kept:
        raise DataError(f'{where}: no usable image/label pair: all {len(pairs)} fail, for example '
                        f'{problems[0][0]}: {problems[0][1]}')
    return kept


class ADE20K(Dataset):
    """Image and label-map pairs of one split.

    An item is ``(image, (label, label_path), problems)``: the image and label after ``transform``
    (without one, the uint8 image (3, H, W) and label (H, W) as stored), and the unreadable files met.
    The label's path travels with it so that the main process can name a file whose labels do not fit
    the model. Training draws ``(pass, index)`` keys from :class:`IterationSampler`: the random
    augmentation of a sample is seeded by (seed, pass, index), so it does not depend on the loader's
    workers, and a resumed run repeats an uninterrupted one.

    skip_corrupt, refill: as in data/robust.py (refill: a skipped training image's slot is taken by
    the next readable one; validation drops it instead).
    """

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, *,
                 reduce_zero_label: bool = True, skip_corrupt: bool = False, refill: bool = True,
                 seed: int = 0):
        self.pairs = check_pairs(list_pairs(root, split), skip_corrupt, f'{root} ({SPLITS[split]})')
        self.transform, self.reduce_zero_label = transform, reduce_zero_label
        self.skip_corrupt, self.refill, self.seed = skip_corrupt, refill, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.pairs[index]
        image = torch.from_numpy(np.array(open_image(image_path))).permute(2, 0, 1)
        label = open_label(label_path)
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        if label.shape != tuple(image.shape[1:]):
            raise CorruptImageError(label_path, f'the label map is {label.shape[1]}x{label.shape[0]} but '
                                                f'its image {image_path} is {image.shape[2]}x{image.shape[1]}')
        return tv_tensors.Image(image), tv_tensors.Mask(torch.from_numpy(label))

    def __getitem__(self, key):
        draw, index = key if isinstance(key, tuple) else (None, key)
        problems = []
        n = len(self.pairs)
        for offset in range(n):
            i = (index + offset) % n
            try:
                image, label = self.read(i)
            except CorruptImageError as e:
                problems.append((e.path, e.reason))
                if self.skip_corrupt and self.refill:
                    continue
                return None, None, problems
            if self.transform is not None:
                # The global generator is restored afterwards: with no workers this runs in the
                # training process, whose own draws (drop path) must not depend on the data.
                with torch.random.fork_rng(devices=()):
                    if draw is not None:
                        torch.default_generator.manual_seed(_seed(self.seed, draw, index))
                    image, label = self.transform(image, label)
            return image.as_subclass(torch.Tensor), (label.as_subclass(torch.Tensor), self.pairs[i][1]), problems
        raise DataError(f'no readable image in the data set: all {n} files failed to decode, '
                        f'for example {problems[0][0]}: {problems[0][1]}')


class IterationSampler(Sampler):
    """An endless stream of ``(pass, index)`` keys for this process.

    Every pass over the data is a fresh permutation, seeded by (seed, pass), split between the
    processes in whole batches (the incomplete last global batch is left out). The stream starts at
    this process's batch number ``start`` (iterations x micro-batches per iteration), so a resumed run
    draws the batches an uninterrupted one would have drawn.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int = 0):
        self.size, self.batch_size, self.seed, self.start = size, batch_size, seed, start
        self.rank, self.world = get_rank(), get_world_size()
        self.per_pass = size // (batch_size * self.world)  # iterations per pass
        if self.per_pass == 0:
            raise DataError(f'the training set has {size} images, fewer than one global batch of '
                            f'{batch_size * self.world} (DATA.BATCH_SIZE {batch_size} x {self.world} processes)')

    def __iter__(self):
        draw, skip = divmod(self.start, self.per_pass)
        while True:
            generator = torch.Generator().manual_seed(_seed(self.seed, draw))
            order = torch.randperm(self.size, generator=generator)[:self.per_pass * self.batch_size * self.world]
            mine = order[self.rank::self.world].tolist()
            for index in mine[skip * self.batch_size:]:
                yield draw, index
            draw, skip = draw + 1, 0




def _own_generator(seed: int) -> torch.Generator:
    # A loader draws a seed for its workers when iterated; from its own generator, that draw leaves
    # the training process's random stream (drop path) the same whether or not a run was resumed.
    return torch.Generator().manual_seed(seed)


def train_loader(dataset: ADE20K, batch_size: int, start: int, *, num_workers: int, pin_memory: bool,
                 skip_corrupt: bool) -> SkipReportingLoader:
    """Batches ``(images, (labels, label_paths))`` of this process from iteration ``start`` on, without end."""
    workers = worker_count(num_workers)
    return SkipReportingLoader(DataLoader(
        dataset, batch_size=batch_size, sampler=IterationSampler(len(dataset), batch_size, dataset.seed, start),
        num_workers=workers, pin_memory=pin_memory, drop_last=True, persistent_workers=workers > 0,
        worker_init_fn=seed_worker, collate_fn=collate_with_problems, generator=_own_generator(dataset.seed)),
        skip_corrupt)


def val_loader(dataset: ADE20K, *, num_workers: int, pin_memory: bool, skip_corrupt: bool) -> SkipReportingLoader:
    """One image at a time, at its stored size; process r of w takes images r, r + w, ... so that every
    image counts once over all processes."""
    indices: Sequence[int] = range(get_rank(), len(dataset), get_world_size())
    return SkipReportingLoader(DataLoader(
        dataset, batch_size=1, sampler=list(indices), num_workers=worker_count(num_workers),
        pin_memory=pin_memory, worker_init_fn=seed_worker, collate_fn=collate_with_problems,
        generator=_own_generator(dataset.seed)), skip_corrupt)


def check_labels(labels: torch.Tensor, paths: Sequence[str], num_classes: int, reduce_zero: bool):
    """Stop, naming the file, when a label map holds a class the model does not have."""
    bad = (labels != IGNORE_INDEX) & (labels >= num_classes)
    if not bad.any():
        return
    i = int(bad.flatten(1).any(1).nonzero()[0])
    value = int(labels[i][bad[i]].max()) + (1 if reduce_zero else 0)
    stored = f'1..{num_classes} (0 is ignored)' if reduce_zero else f'0..{num_classes - 1}'
    raise DataError(f'label map {paths[i]} holds class {value}, but the model has {num_classes} classes '
                    f'(MODEL.NUM_CLASSES), stored as {stored}; set MODEL.NUM_CLASSES to the data set\'s number')
