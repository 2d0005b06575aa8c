"""Training input pipeline speed: timm's transform against data.fast_transform, per loader core.

``python tools/benchmark.py --pipeline`` runs this. Both transforms are built from the same config
(the release recipe unless ``--opts`` change it) and read the same files through the same data set
class and DataLoader settings; their loaders alternate round by round in one process, so load from
other jobs on the machine hits both alike and the ratio holds even where the absolute rates do not.
Images/s per core is the images delivered per CPU-second used by the loader's worker processes (by
the main process with 0 workers), so time the CPU spends on other jobs is not counted against either;
the wall-clock rate per worker is reported beside it. The fast path's batches leave the loader as 8-bit
images; their normalisation and random erasing run on the training device when they are moved there
(as timm's prefetcher does), so they are not in its loader time; their cost on this CPU is reported
beside it. 'ours' is the fast path as a GPU node runs it: the flip and RandAugment's ops are also
left to the device (data.device_augment); 'ours, CPU training' is the fast path as it runs when the
model trains on the CPU, with every RandAugment op done in the loader; 'ours, DATA.GPU_DECODE' leaves
the decoding of plain JPEGs to the GPU as well (the loader only reads headers and draws).
"""
import io
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from timm.data.constants import IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

import config as cfg
from data.fast_transform import FastTrainTransform, RawBatch, fast_train_transform
from data.photos import write_photo_folder
from data.robust import RobustImageFolder, collate_with_problems, decode_image
from data.sampler import ResumableSampler, SeededSamples
from data.transforms import build_train_transform, build_transform

# Sides of the JPEGs made from the bundled photos: ImageNet's training images are mostly 500 x 375,
# 500 x 333 and 375 x 500, with a mean of about 400 x 350.
PHOTO_SIDES = (250, 500)


def photo_folder(count: int, sides: Tuple[int, int] = PHOTO_SIDES) -> Path:
    """An ImageFolder of ``count`` JPEGs made from the bundled photos, in a temporary folder."""
    root = Path(tempfile.mkdtemp(prefix='pipeline_bench_'))
    return write_photo_folder(root, count, seed=0, sizes=sides) / 'train'


def _loader(root: Path, transform, batch_size: int, workers: int) -> DataLoader:
    dataset = RobustImageFolder(str(root), transform)
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, seed=0)
    return DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=True, persistent_workers=workers > 0, collate_fn=collate_with_problems,
                      prefetch_factor=2 if workers else None)


def _cpu_seconds(pids: List[int]) -> float:
    """User plus system CPU seconds used so far by the processes ``pids`` (Linux /proc)."""
    total = 0
    for pid in pids:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf('SC_CLK_TCK')


def _time_epoch(loader: DataLoader, epoch: int) -> Tuple[int, float, float]:
    """(images, wall seconds, loader CPU seconds) of one pass over the loader, the first batch not
    counted (workers start). The CPU seconds are the worker processes' (this process's without
    workers): the cores the loader keeps busy, whatever else runs on the machine."""
    loader.sampler.set_epoch(epoch)
    images, start = 0, None
    it = iter(loader)
    pids = [w.pid for w in getattr(it, '_workers', [])]
    cpu = (lambda: _cpu_seconds(pids)) if pids else time.process_time
    for batch, _, _ in it:
        if start is None:
            start, cpu_start = time.perf_counter(), cpu()
            continue
        images += len(batch)
    return images, time.perf_counter() - start, cpu() - cpu_start


def run_pipeline(*args, **kwargs):
    """The benchmark with torch on one thread in the main process, as in a loader worker; the caller's
    thread count is restored afterwards (tools/benchmark.py is also called in-process, by tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_pipeline(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _run_pipeline(data_path, workers: List[int], rounds: int, batch_size: int, images: int,
                 gpu_rate: float, gpus: int, opts: List[str], psnr_images: int = 100,
                 sides: Tuple[int, int] = PHOTO_SIDES) -> Tuple[List[dict], List[str]]:
    config = cfg.load_config(None, opts)
    if data_path:
        root = Path(data_path)
        root = root / 'train' if (root / 'train').is_dir() else root
        source = str(root)
    else:
        root = photo_folder(images, sides)
        source = f'{images} JPEGs made from the bundled photos, sides {sides[0]}-{sides[1]} px'
    transforms = {'timm': build_transform(True, config),
                  'ours': build_train_transform(config, device_augment=True),
                  'ours_cpu_training': build_train_transform(config, device_augment=False),
                  # DATA.GPU_DECODE (needs a GPU to train on; the loader side runs anywhere).
                  'ours_gpu_decode': fast_train_transform(build_transform(True, config), gpu_decode=True)}
    if not isinstance(transforms['ours'], FastTrainTransform):
        raise ValueError('the fast path does not apply to this configuration (see DATA.FAST_PIPELINE)')
    rows, lines = [], [f'data: {source}', f'load average at start: {os.getloadavg()[0]:.1f} '
                       f'on {os.cpu_count()} CPUs (shared machines: rely on the ratio)']
    for n in workers:
        loaders = {name: _loader(root, t, batch_size, n) for name, t in transforms.items()}
        totals = {name: [0, 0.0, 0.0] for name in loaders}
        for r in range(rounds + 1):  # round 0 warms up (workers start, files enter the page cache)
            for name, loader in loaders.items():
                timed = _time_epoch(loader, r)
                if r:
                    totals[name] = [t + x for t, x in zip(totals[name], timed)]
        # Per core: images per CPU-second of the loader's processes; per core by the wall clock:
        # images/s over the worker count (what it gives when each worker has a core to itself).
        per_core = {name: c / cpu for name, (c, _, cpu) in totals.items()}
        wall = {name: c / s / max(n, 1) for name, (c, s, _) in totals.items()}
        row = {'workers': n, 'batch_size': batch_size, 'rounds': rounds, 'images_timed': totals['ours'][0],
               'timm_images_per_s_per_core': per_core['timm'], 'ours_images_per_s_per_core': per_core['ours'],
               'ratio': per_core['ours'] / per_core['timm'],
               'timm_images_per_s_per_worker_wall': wall['timm'], 'ours_images_per_s_per_worker_wall': wall['ours'],
               'ratio_wall': wall['ours'] / wall['timm'],
               'ours_cpu_training_images_per_s_per_core': per_core['ours_cpu_training'],
               'ratio_cpu_training': per_core['ours_cpu_training'] / per_core['timm'],
               'ours_gpu_decode_images_per_s_per_core': per_core['ours_gpu_decode'],
               'ratio_gpu_decode': per_core['ours_gpu_decode'] / per_core['timm'],
               'gpu_rate': gpu_rate, 'gpus': gpus,
               'timm_cores_needed': gpus * gpu_rate / per_core['timm'],
               'ours_cores_needed': gpus * gpu_rate / per_core['ours'],
               'finish_ms_per_image_cpu': _finish_cost(loaders['ours_cpu_training']),
               'load_average': os.getloadavg()[0]}
        rows.append(row)
        lines.append(f'{n} worker(s): timm {per_core["timm"]:.0f} images per CPU-second, ours '
                     f'{per_core["ours"]:.0f} ({row["ratio"]:.2f}x; by the wall clock {row["ratio_wall"]:.2f}x); '
                     f'cores for {gpus} GPUs at {gpu_rate:.0f} images/s each: timm '
                     f'{row["timm_cores_needed"]:.0f}, ours {row["ours_cores_needed"]:.0f}; '
                     f'ours as run for CPU training {per_core["ours_cpu_training"]:.0f} '
                     f'({row["ratio_cpu_training"]:.2f}x); with DATA.GPU_DECODE '
                     f'{per_core["ours_gpu_decode"]:.0f} ({row["ratio_gpu_decode"]:.2f}x); '
                     f'load average {row["load_average"]:.1f}')
    files = [Path(p) for p, _ in RobustImageFolder(str(root)).samples][:psnr_images]
    psnr = {'recipe': _summary(psnr_against_timm(files, opts)),
            'crop_flip_erase': _summary(psnr_against_timm(
                files, opts + ['AUG.AUTO_AUGMENT', 'none', 'AUG.COLOR_JITTER', '0']))}
    for row in rows:
        row['psnr_db'] = psnr
    for name, v in psnr.items():
        lines.append(f'PSNR against timm, same draws, {v["images"]} images, {name}: min {v["min"]:.1f} dB, '
                     f'median {v["median"]:.1f}, mean {v["mean_capped_99"]:.1f} (identical images as 99)')
    lines.append(f'(ours leaves normalisation and random erasing to the training device: '
                 f'{rows[-1]["finish_ms_per_image_cpu"]:.3f} ms per image when that device is this CPU; on a GPU '
                 f'node, also the flip and RandAugment: benchmarks/gpu_check.sh times that)')
    return rows, lines


def _seeded(seed: int, fn):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return fn()


def psnr_against_timm(files: List[Path], opts: List[str]) -> List[float]:
    """PSNR (8-bit levels) of our training image against timm's for each file, the same seed for
    both, so the same crop, flip, RandAugment ops and erased boxes (with the same noise)."""
    config = cfg.load_config(None, opts)
    reference, fast = build_transform(True, config), build_train_transform(config, device_augment=True)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255
    values = []
    for seed, path in enumerate(files):
        data = path.read_bytes()
        ref = _seeded(seed, lambda: reference(decode_image(io.BytesIO(data), str(path))))
        ours = RawBatch.collate([_seeded(seed, lambda: fast(data, str(path)))]).to('cpu')[0]
        mse = float((((ref - ours) * std) ** 2).mean())
        values.append(math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse))
    return values


def _summary(values: List[float]) -> dict:
    finite = [min(v, 99.0) for v in values]  # identical images count as 99 dB in the mean
    return {'min': min(values), 'median': statistics.median(values), 'mean_capped_99': statistics.mean(finite),
            'images': len(values)}


def _finish_cost(loader: DataLoader) -> float:
    """Milliseconds per image of RawBatch.to('cpu') (normalise, erase) on a batch of the loader."""
    batch = next(iter(loader))[0]
    if not isinstance(batch, RawBatch):
        raise TypeError(f'expected 8-bit batches from the fast path, got {type(batch).__name__}')
    batch.to('cpu')  # warm-up
    start = time.process_time()
    for _ in range(3):
        batch.to('cpu')
    return (time.process_time() - start) * 1e3 / len(batch) / 3
