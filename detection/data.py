"""COCO-layout instance data for the detectors: torchvision's CocoDetection, its v2 wrapper (boxes
and masks as tv_tensors, polygons and RLE decoded by pycocotools) and v2 transforms.

Layout: ``<root>/annotations/instances_<split>.json`` and ``<root>/<split>/<file_name>``. Any category
ids (they become labels 1..K in the order of their ids), images without annotations, crowd regions
(left out of the training targets; COCOeval treats them as "ignore" in evaluation), polygon and RLE
masks.
"""
import contextlib
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, VisionDataset, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from data.files import not_regular
from data.robust import CorruptImageError, DataError, Problem, SkipReportingLoader, open_image
from data.sampler import ResumableSampler, SeededSamples
from data.workers import worker_count
from engine.seed import derive_seed, seed_worker
from utils import get_rank, get_world_size

from .annotations import load_coco
from .recipe import AspectRatioBatchSampler, landscape_groups

logger = logging.getLogger('focalnet')


class CocoImages(CocoDetection):
    """CocoDetection over an already checked document (detection/annotations.py), decoding each image
    eagerly and naming a damaged or missing file."""

    def __init__(self, root: str, coco):
        VisionDataset.__init__(self, root)
        self.coco = coco
        self.ids = sorted(coco.imgs.keys())

    def _load_image(self, id: int):
        return open_image(os.path.join(self.root, self.coco.loadImgs(id)[0]['file_name']))


def read_coco(root: str, split: str, masks: bool = True, drop_degenerate: bool = False) -> CocoImages:
    """The split's images and checked annotations. ``drop_degenerate``: leave out the objects no
    detector can learn from (training), counted in the log; evaluation keeps them, as COCOeval does."""
    images = os.path.join(root, split)
    annotations = os.path.join(root, 'annotations', f'instances_{split}.json')
    for path, what in ((root, 'COCO root'), (annotations, 'annotation file'), (images, 'image folder')):
        if not os.path.exists(path):
            raise DataError(f'{what} not found: {path} (expected the COCO layout: '
                            f'annotations/instances_{split}.json and {split}/)')
        if what != 'annotation file' and not os.path.isdir(path):
            raise DataError(f'{what} {path} is {not_regular(path) or "a file"}, not a folder')
    checked = load_coco(annotations, masks)
    document = checked.dataset
    if not document['images']:
        raise DataError(f'{annotations} lists no images: the {split} split is empty')
    if checked.degenerate:
        reasons = Counter(checked.degenerate.values())
        what = 'left out of the training targets' if drop_degenerate else 'kept for the evaluation, as COCOeval scores them'
        logger.warning(f'{annotations}: {len(checked.degenerate)} of {len(document["annotations"])} objects '
                       f'cover no usable area ({", ".join(f"{n} {r}" for r, n in reasons.most_common())}); {what}')
        if drop_degenerate:
            document = dict(document, annotations=[a for a in document['annotations']
                                                   if a['id'] not in checked.degenerate])
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = document
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while it indexes
        coco.createIndex()
    return CocoImages(images, coco)


class CocoTargets:
    """The wrapper's target made what the detectors take: category ids mapped to labels 1..K, crowd
    regions removed, and empty boxes (and masks) for an image without objects."""

    def __init__(self, category_to_label: Dict[int, int], with_masks: bool):
        self.category_to_label, self.with_masks = category_to_label, with_masks

    def __call__(self, image, target):
        H, W = TF.get_size(image)
        target = dict(target)
        keep = torch.tensor([not c for c in target.pop('iscrowd', [])], dtype=torch.bool)
        boxes = target.get('boxes')
        if boxes is None:
            boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format='XYXY', canvas_size=(H, W))
            labels = torch.zeros(0, dtype=torch.int64)
            masks = torch.zeros(0, H, W, dtype=torch.uint8)
        else:
            labels = torch.tensor([self.category_to_label[int(c)] for c in target['labels']],
                                  dtype=torch.int64)
            boxes, labels = tv_tensors.wrap(boxes[keep], like=boxes), labels[keep]
            masks = target['masks'][keep] if self.with_masks else None
        target['boxes'], target['labels'] = boxes, labels
        if self.with_masks:
            target['masks'] = tv_tensors.Mask(masks)
        return image, target


class RandomCropAbsolute(v2.Transform):
    """A crop of random height and width in [min_size, max_size] (at most the image's) at a random
    place: mmdetection's RandomCrop with crop_type 'absolute_range'. v2.functional.crop moves the
    boxes and masks along; SanitizeBoundingBoxes afterwards drops what fell outside."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: List) -> dict:
        H, W = v2.query_size(flat_inputs)
        h = int(torch.randint(min(H, self.min_size), min(H, self.max_size) + 1, ()))
        w = int(torch.randint(min(W, self.min_size), min(W, self.max_size) + 1, ()))
        top = int(torch.randint(0, H - h + 1, ()))
        left = int(torch.randint(0, W - w + 1, ()))
        return dict(top=top, left=left, height=h, width=w)

    def transform(self, inpt, params: dict):
        return self._call_kernel(TF.crop, inpt, **params)


def build_transforms(config, train: bool, category_to_label: Dict[int, int], with_masks: bool):
    d = config.DETECTION
    steps = [CocoTargets(category_to_label, with_masks)] if train else []
    if train:
        if d.HFLIP > 0:
            steps.append(v2.RandomHorizontalFlip(d.HFLIP))
        if len(d.CROP_RESIZE):
            # The multi-scale resize of both policies happens in the detector (its transform).
            steps.append(v2.RandomChoice([
                v2.Identity(),
                v2.Compose([v2.RandomShortestSize(list(d.CROP_RESIZE), max_size=d.MAX_SIZE),
                            RandomCropAbsolute(*d.CROP_SIZE)]),
            ]))
        steps.append(v2.SanitizeBoundingBoxes())
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()]
    return v2.Compose(steps)


class DetectionSet(Dataset):
    """(image, target) samples of a COCO split; an unreadable image is recorded, not raised, so the
    main process can stop with its name or skip it (data.robust.SkipReportingLoader)."""

    def __init__(self, coco: CocoImages, indices: Sequence[int], transforms, target_keys: set, *,
                 skip_corrupt: bool, refill: bool):
        coco.transforms = transforms
        self.samples = wrap_dataset_for_transforms_v2(coco, target_keys=target_keys)
        self.image_ids = [coco.ids[i] for i in indices]
        self.indices = list(indices)
        self.skip_corrupt, self.refill = skip_corrupt, refill

    def __len__(self) -> int:
        return len(self.indices)

    def fetch(self, index: int) -> Tuple[Optional[torch.Tensor], Optional[dict], List[Problem]]:
        problems: List[Problem] = []
        n = len(self.indices)
        for offset in range(n):
            try:
                image, target = self.samples[self.indices[(index + offset) % n]]
                return image, target, problems
            except CorruptImageError as e:
                problems.append((e.path, e.reason))
                if not (self.skip_corrupt and self.refill):
                    return None, None, problems
        raise DataError(f'no readable image in the data set: all {n} failed, for example '
                        f'{problems[0][0]}: {problems[0][1]}')

    def __getitem__(self, index: int):
        return self.fetch(index)


def collate(samples: list):
    """(images, targets, problems): lists of tensors and target dicts (images differ in size)."""
    kept = [(image, target) for image, target, _ in samples if image is not None]
    problems = tuple(p for _, _, ps in samples for p in ps)
    if not kept:
        return None, None, problems
    images, targets = zip(*kept)
    return list(images), list(targets), problems


class ResumableBatches(Sampler):
    """AspectRatioBatchSampler's batches over ResumableSampler's (index, seed) keys, resumable
    part-way through an epoch: which samples share a batch depends on the epoch's whole order, so
    the batches are formed from its start and the first ``start`` skipped (indices only: no image is
    read for them)."""

    def __init__(self, sampler: ResumableSampler, group_ids: Sequence[int], batch_size: int):
        self.sampler, self.group_ids, self.batch_size = sampler, list(group_ids), batch_size
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0):
        self.sampler.set_epoch(epoch, 0)
        self.start = start

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.num_samples // self.batch_size

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start)

    def __iter__(self):
        keys = list(self.sampler)  # the epoch's (index, seed) in order
        groups = [self.group_ids[index] for index, _ in keys]
        for n, batch in enumerate(AspectRatioBatchSampler(range(len(keys)), groups, self.batch_size)):
            if n >= self.start:
                yield [keys[position] for position in batch]


@dataclass
class DetectionLoaders:
    """What build_detection_loaders learns: the loaders, the classes, the validation annotations."""
    train: Optional[SkipReportingLoader]
    val: SkipReportingLoader
    val_coco: object                 # pycocotools COCO of the validation split
    label_to_category: List[int]     # label l (1..K) is category id label_to_category[l - 1]
    category_names: List[str]
    seed: int

    @property
    def num_classes(self) -> int:
        return len(self.label_to_category)

    @property
    def steps_per_epoch(self) -> int:
        """Training batches of a whole epoch (the loader's length shrinks in a resumed epoch)."""
        batches = self.train.batch_sampler
        if isinstance(batches, ResumableBatches):
            return batches.steps_per_epoch
        return self.train.sampler.num_samples // self.train.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0):
        """Reshuffle for ``epoch``, starting after its first ``start_step`` batches (a run resumed
        part-way through it), and reseed the workers from (seed, epoch, rank)."""
        if self.train is not None:
            batches = self.train.batch_sampler
            if isinstance(batches, ResumableBatches):
                batches.set_epoch(epoch, start_step)
            else:
                self.train.sampler.set_epoch(epoch, start_step * self.train.batch_size)
            self.train.generator.manual_seed(derive_seed(self.seed, epoch, get_rank()))


def build_detection_loaders(config, train: bool = True, with_masks: bool = True) -> DetectionLoaders:
    """Validation loader (every image once over all processes), and the training loader unless
    ``train`` is False. Labels follow the validation file's categories, which the training file must
    share."""
    d, root = config.DATA, config.DATA.DATA_PATH
    if not root:
        raise DataError('no data: pass --data-path <COCO root>')
    val_coco = read_coco(root, config.DETECTION.VAL_SPLIT, with_masks)
    categories = sorted(val_coco.coco.getCatIds())
    category_to_label = {c: i + 1 for i, c in enumerate(categories)}
    names = [val_coco.coco.cats[c].get('name', str(c)) for c in categories]
    pin = d.PIN_MEMORY and torch.cuda.is_available()
    world, rank = get_world_size(), get_rank()

    # Each process takes every world-th image, without the padding of DistributedSampler.
    val_set = DetectionSet(val_coco, range(rank, len(val_coco), world),
                           build_transforms(config, False, category_to_label, with_masks),
                           {'image_id'}, skip_corrupt=d.SKIP_CORRUPT, refill=False)
    # One image per step, as mmdetection tests: a batch pads its images to a common size, and the
    # padding would make the scores depend on which images share a batch.
    val_loader = SkipReportingLoader(DataLoader(
        val_set, batch_size=1, shuffle=False, num_workers=worker_count(config.DATA.NUM_WORKERS),
        pin_memory=pin, worker_init_fn=seed_worker, collate_fn=collate), d.SKIP_CORRUPT)

    train_loader = None
    if train:
        train_coco = read_coco(root, config.DETECTION.TRAIN_SPLIT, with_masks, drop_degenerate=True)
        if sorted(train_coco.coco.getCatIds()) != categories:
            raise DataError(f'the {config.DETECTION.TRAIN_SPLIT} and {config.DETECTION.VAL_SPLIT} '
                            f'annotations define different categories: '
                            f'{sorted(train_coco.coco.getCatIds())} vs {categories}')
        indices = range(len(train_coco))
        if config.DETECTION.FILTER_EMPTY:
            has_objects = {a['image_id'] for a in train_coco.coco.anns.values() if not a.get('iscrowd', 0)}
            indices = [i for i, image_id in enumerate(train_coco.ids) if image_id in has_objects]
        if len(indices) < d.BATCH_SIZE * world:
            raise DataError(f'the training set has {len(indices)} usable images, fewer than one global '
                            f'batch ({d.BATCH_SIZE} x {world} processes); lower --batch-size')
        keys = {'image_id', 'boxes', 'labels', 'iscrowd'} | ({'masks'} if with_masks else set())
        train_set = DetectionSet(train_coco, indices,
                                 build_transforms(config, True, category_to_label, with_masks),
                                 keys, skip_corrupt=d.SKIP_CORRUPT, refill=True)
        # Each sample is augmented from a seed of its own position in the epoch (data/sampler.py), so
        # a run resumed part-way through an epoch repeats the uninterrupted one exactly.
        sampler = ResumableSampler(train_set, num_replicas=world, rank=rank, seed=config.SEED)
        if config.DETECTION.GROUP_ASPECT_RATIO:
            # One orientation per batch, as mmdetection's GroupSampler (detection/recipe.py).
            batching = dict(batch_sampler=ResumableBatches(
                sampler, landscape_groups(train_coco.coco, train_set.image_ids), d.BATCH_SIZE))
        else:
            batching = dict(batch_size=d.BATCH_SIZE, sampler=sampler, drop_last=True)
        train_loader = SkipReportingLoader(DataLoader(
            SeededSamples(train_set), **batching, num_workers=worker_count(config.DATA.NUM_WORKERS),
            pin_memory=pin, worker_init_fn=seed_worker, generator=torch.Generator(),
            persistent_workers=False, collate_fn=collate), d.SKIP_CORRUPT)
    return DetectionLoaders(train_loader, val_loader, val_coco.coco, categories, names, config.SEED)
