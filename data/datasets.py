"""The data sets main.py reads: ImageFolder trees, the official zipped layout and synthetic images."""
import io
import logging
import os
import re
import zipfile
import zlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from errors import UserError

from .robust import CorruptImageError, RobustImageFolder, SkipCorruptMixin, decode_image

logger = logging.getLogger('focalnet')


class FakeImages(Dataset):
    """Random RGB images with labels ``index % num_classes``; the same image for the same index."""

    def __init__(self, size: int, num_classes: int, img_size: int, transform: Optional[Callable] = None,
                 offset: int = 0):
        self.size, self.num_classes, self.img_size = size, num_classes, img_size
        self.transform, self.offset = transform, offset

    def __len__(self):
        return self.size

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.offset + index)
        pixels = torch.randint(0, 256, (self.img_size, self.img_size, 3), dtype=torch.uint8, generator=g)
        image = Image.fromarray(pixels.numpy())
        return (self.transform(image) if self.transform else image), index % self.num_classes


class ZipImageDataset(SkipCorruptMixin, Dataset):
    """Images inside a zip file, listed by a map file of ``<name>\\t<class index>`` lines.

    The name may carry the zip's name before an ``@`` (``train.zip@/n01440764/x.JPEG``), as the
    official map files do. The zip is opened once per process, on first use, so loader workers do not
    share a file handle.
    """

    def __init__(self, zip_path: str, map_path: str, transform: Optional[Callable] = None, *,
                 skip_corrupt: bool = False, refill: bool = True):
        for path in (zip_path, map_path):
            if not os.path.isfile(path):
                raise UserError(f'zipped data set file not found: {path}')
        self.zip_path, self.transform = zip_path, transform
        self.skip_corrupt, self.refill = skip_corrupt, refill
        self.samples = _read_map(map_path)
        try:
            with zipfile.ZipFile(zip_path) as z:
                names = set(z.namelist())
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise UserError(f'{zip_path} is not a readable zip file: {e}') from None
        missing = [name for name, _ in self.samples if name not in names]
        if missing:
            raise UserError(f'{len(missing)} images of {map_path} are not in {zip_path}, '
                            f'for example {missing[0]!r}')
        self.num_classes = max(t for _, t in self.samples) + 1
        unused = sorted(set(range(self.num_classes)) - {t for _, t in self.samples})
        if unused:
            shown = ', '.join(map(str, unused[:10])) + (f' and {len(unused) - 10} more' if len(unused) > 10 else '')
            logger.warning(f'{map_path}: {len(unused)} of the class indices 0..{self.num_classes - 1} have no '
                           f'images: {shown}')
        self._zip = None
        self._pid = None

    def __len__(self):
        return len(self.samples)

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_zip'] = state['_pid'] = None
        return state

    def read_encoded(self, index: int) -> Tuple[bytes, str]:
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.zip_path), os.getpid()
        name = self.samples[index][0]
        where = f'{self.zip_path}@{name}'
        try:
            return self._zip.read(name), where
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:  # a damaged member
            raise CorruptImageError(where, f'cannot read it from the zip: {e}') from None

    def read_image(self, index: int) -> Image.Image:
        data, where = self.read_encoded(index)
        return decode_image(io.BytesIO(data), where)


# A class index: ASCII digits only (str.isdigit also takes other scripts' digits and superscripts).
_CLASS_INDEX = re.compile(r'[0-9]+')


def _read_map(map_path: str) -> List[Tuple[str, int]]:
    """(name in the zip, class index) of each ``<name>\\t<class index>`` line of a map file."""
    samples = []
    try:
        with open(map_path, 'rb') as f:
            lines = f.read().split(b'\n')
    except OSError as e:
        raise UserError(f'cannot read {map_path}: {e.strerror or e}') from None
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode('utf-8').rstrip('\r')
        except UnicodeDecodeError as e:
            raise UserError(f'{map_path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column '
                            f'{e.start + 1}); map files are UTF-8') from None
        fields = [x for x in line.split('\t') if x]
        if not fields:
            continue
        if len(fields) < 2 or not _CLASS_INDEX.fullmatch(fields[1].strip()):
            raise UserError(f'{map_path}:{n}: expected "<image name>\\t<class index>" with a class index '
                            f'of 0 or more, got {line.strip()!r}')
        name = fields[0].split('@', 1)[-1].lstrip('/')
        samples.append((name, int(fields[1])))
    if not samples:
        raise UserError(f'no images listed in {map_path}')
    return samples


def build_dataset(split: str, config, transform,
                  class_to_idx: Optional[Dict[str, int]] = None) -> Tuple[Dataset, int]:
    """The ``split`` ('train' or 'val') of the configured data set, and its number of classes.
    ``class_to_idx``: the training set's, for the validation folder (its classes must be among them).
    A damaged image stops the run unless DATA.SKIP_CORRUPT (see data.robust); the training set then
    puts the next readable image in its place, validation drops it."""
    data = config.DATA
    if data.DATASET == 'fake':
        size = data.FAKE_SIZE if split == 'train' else max(1, data.FAKE_SIZE // 4)
        # Validation images differ from the training images.
        offset = 0 if split == 'train' else 1 << 30
        return FakeImages(size, config.MODEL.NUM_CLASSES, data.IMG_SIZE, transform, offset), \
            config.MODEL.NUM_CLASSES
    if not data.DATA_PATH:
        raise UserError(f'--data-path is required for --dataset {data.DATASET}')
    if not os.path.isdir(data.DATA_PATH):
        raise UserError(f'data path not found: {data.DATA_PATH}')
    if data.ZIP_MODE:
        dataset = ZipImageDataset(os.path.join(data.DATA_PATH, f'{split}.zip'),
                                  os.path.join(data.DATA_PATH, f'{split}_map.txt'), transform,
                                  skip_corrupt=data.SKIP_CORRUPT, refill=split == 'train')
        return dataset, dataset.num_classes
    dataset = RobustImageFolder(os.path.join(data.DATA_PATH, split), transform,
                                skip_corrupt=data.SKIP_CORRUPT, refill=split == 'train',
                                class_to_idx=class_to_idx)
    return dataset, len(dataset.classes)
