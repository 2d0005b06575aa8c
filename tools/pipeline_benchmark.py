"""Training input pipeline speed: timm's transform against data.fast_transform, per loader core.

``python tools/benchmark.py --pipeline`` runs this. Both transforms are built from the same config
(the release recipe unless ``--opts`` change it) and read the same files through the same data set
class and DataLoader settings; their loaders alternate round by round in one process, so load from
other jobs on the machine hits both alike and the ratio holds even where the absolute rates do not.
Images/s per core is the loader's images/s divided by its worker processes (each keeps one core busy;
with 0 workers, the main process is the one core). The fast path's batches leave the loader as 8-bit
images; their normalisation and random erasing run on the training device when they are moved there
(as timm's prefetcher does), so they are not in its loader time; their cost on this CPU is reported
beside it.
"""
import os
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

import torch
from torch.utils.data import DataLoader

import config as cfg
from data.fast_transform import RawBatch
from data.photos import write_photo_folder
from data.robust import RobustImageFolder, collate_with_problems
from data.sampler import ResumableSampler, SeededSamples
from data.transforms import build_train_transform, build_transform

# Sides of the JPEGs made from the bundled photos: ImageNet's training images are mostly 500 x 375,
# 500 x 333 and 375 x 500, with a mean of about 400 x 350.
PHOTO_SIDES = (250, 500)


def photo_folder(count: int) -> Path:
    """An ImageFolder of ``count`` JPEGs made from the bundled photos, in a temporary folder."""
    root = Path(tempfile.mkdtemp(prefix='pipeline_bench_'))
    return write_photo_folder(root, count, seed=0, sizes=PHOTO_SIDES) / 'train'


def _loader(root: Path, transform, batch_size: int, workers: int) -> DataLoader:
    dataset = RobustImageFolder(str(root), transform)
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, seed=0)
    return DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=True, persistent_workers=workers > 0, collate_fn=collate_with_problems,
                      prefetch_factor=2 if workers else None)


def _time_epoch(loader: DataLoader, epoch: int) -> Tuple[int, float]:
    """(images, seconds) of one pass over the loader, the first batch not counted (workers start)."""
    loader.sampler.set_epoch(epoch)
    images, start = 0, None
    for batch, _, _ in loader:
        if start is None:
            start = time.perf_counter()
            continue
        images += len(batch)
    return images, time.perf_counter() - start


def run_pipeline(data_path, workers: List[int], rounds: int, batch_size: int, images: int,
                 gpu_rate: float, gpus: int, opts: List[str]) -> Tuple[List[dict], List[str]]:
    config = cfg.load_config(None, opts)
    if data_path:
        root = Path(data_path)
        root = root / 'train' if (root / 'train').is_dir() else root
        source = str(root)
    else:
        root = photo_folder(images)
        source = f'{images} JPEGs made from the bundled photos, sides {PHOTO_SIDES[0]}-{PHOTO_SIDES[1]} px'
    transforms = {'timm': build_transform(True, config), 'ours': build_train_transform(config)}
    if transforms['ours'] is transforms['timm']:
        raise ValueError('the fast path does not apply to this configuration (see DATA.FAST_PIPELINE)')
    torch.set_num_threads(1)
    rows, lines = [], [f'data: {source}', f'load average at start: {os.getloadavg()[0]:.1f} '
                       f'on {os.cpu_count()} CPUs (shared machines: rely on the ratio)']
    for n in workers:
        loaders = {name: _loader(root, t, batch_size, n) for name, t in transforms.items()}
        totals = {name: [0, 0.0] for name in loaders}
        for r in range(rounds + 1):  # round 0 warms up (workers start, files enter the page cache)
            for name, loader in loaders.items():
                count, seconds = _time_epoch(loader, r)
                if r:
                    totals[name][0] += count
                    totals[name][1] += seconds
        cores = max(n, 1)
        per_core = {name: c / s / cores for name, (c, s) in totals.items()}
        row = {'workers': n, 'batch_size': batch_size, 'rounds': rounds, 'images_timed': totals['ours'][0],
               'timm_images_per_s_per_core': per_core['timm'], 'ours_images_per_s_per_core': per_core['ours'],
               'ratio': per_core['ours'] / per_core['timm'], 'gpu_rate': gpu_rate, 'gpus': gpus,
               'timm_cores_needed': gpus * gpu_rate / per_core['timm'],
               'ours_cores_needed': gpus * gpu_rate / per_core['ours'],
               'finish_ms_per_image_cpu': _finish_cost(loaders['ours']),
               'load_average': os.getloadavg()[0]}
        rows.append(row)
        lines.append(f'{n} worker(s): timm {per_core["timm"]:.0f} images/s per core, ours '
                     f'{per_core["ours"]:.0f} ({row["ratio"]:.2f}x); cores for {gpus} GPUs at '
                     f'{gpu_rate:.0f} images/s each: timm {row["timm_cores_needed"]:.0f}, ours '
                     f'{row["ours_cores_needed"]:.0f}; load average {row["load_average"]:.1f}')
    lines.append(f'(ours leaves normalisation and random erasing to the training device: '
                 f'{rows[-1]["finish_ms_per_image_cpu"]:.3f} ms per image when that device is this CPU)')
    return rows, lines


def _finish_cost(loader: DataLoader) -> float:
    """Milliseconds per image of RawBatch.to('cpu') (normalise, erase) on a batch of the loader."""
    batch = next(iter(loader))[0]
    if not isinstance(batch, RawBatch):
        raise TypeError(f'expected 8-bit batches from the fast path, got {type(batch).__name__}')
    start = time.perf_counter()
    batch.to('cpu')
    return (time.perf_counter() - start) * 1e3 / len(batch)
