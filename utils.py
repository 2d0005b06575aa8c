"""Distributed setup, random seeds, metric reduction, and the one save and one load of a checkpoint."""
import datetime
import glob
import logging
import os
import random
import re
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

import faults
from errors import TrainingStopped, UserError

logger = logging.getLogger('focalnet')

# ---------------------------------------------------------------------------------------------------
# Distributed: optional, read from the environment that torchrun and torch.distributed.launch set.
# ---------------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_distributed(local_rank: Optional[int] = None, timeout_s: float = 1800) -> torch.device:
    """Join the process group when a launcher started this process (RANK in the environment); return
    the device this process computes on. NCCL on CUDA, gloo on the CPU. A collective that waits longer
    than ``timeout_s`` for a process (one that died or hangs) fails instead of waiting forever."""
    if 'LOCAL_RANK' in os.environ:
        local_rank = int(os.environ['LOCAL_RANK'])
    local_rank = local_rank or 0
    if torch.cuda.is_available():
        device = torch.device('cuda', local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels once
    else:
        device = torch.device('cpu')
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and not is_distributed():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        kwargs = {'device_id': device} if device.type == 'cuda' else {}
        dist.init_process_group(backend=backend, init_method='env://',
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return device


def cleanup_distributed():
    if is_distributed():
        dist.destroy_process_group()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (just [obj] when not distributed)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over all processes (the tensor itself when not distributed)."""
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


# ---------------------------------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------------------------------


def derive_seed(seed: int, epoch: int, rank: int) -> int:
    """A 32-bit seed that depends only on (seed, epoch, rank), so that epoch E of a resumed run draws the
    same random numbers as epoch E of an uninterrupted one."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def seed_worker(worker_id: int):
    """DataLoader worker_init_fn: numpy and random follow the worker's torch seed, which the loader
    derives from its generator (seeded per epoch)."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict:
    """Every generator's state, as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'name': np_state[0], 'keys': torch.from_numpy(np_state[1].astype(np.int64)),
                  'pos': int(np_state[2]), 'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': random.getstate(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state((n['name'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


# ---------------------------------------------------------------------------------------------------
# Checkpoints: written whole or not at all, read without executing code.
# ---------------------------------------------------------------------------------------------------

# Checkpoints are named by the position they were saved at: ckpt_epoch_<N>.pth for epoch-based runs
# (classification, detection), ckpt_iter_<N>.pth for iteration-based ones (segmentation).
CHECKPOINT_UNITS = ('epoch', 'iter')


def checkpoint_path(output_dir: str, position: int, unit: str = 'epoch') -> str:
    return os.path.join(output_dir, f'ckpt_{unit}_{position}.pth')


def _atomic_torch_save(obj, path: str, epoch: int = -1):
    """Write to a temporary file in the same folder, flush it to disk, then rename it over ``path``:
    a reader sees the old file or the complete new one, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    try:
        try:
            with open(tmp, 'wb') as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:  # a full disk, a quota, a file system gone away
            raise TrainingStopped(f'cannot write the checkpoint {path}: {e}; the checkpoints already '
                                  f'in the folder are intact') from None
        faults.inject('save', epoch)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _check_finite(module, what: str, epoch: int):
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingStopped(f'the {what} weights after epoch {epoch} are not finite ({name}); '
                                  f'the checkpoint was not written')


def _remove_stale_temporaries(directory: str):
    """Temporary files of saves that were killed before their rename (never complete)."""
    for tmp in glob.glob(os.path.join(glob.escape(directory), '.ckpt_*.pth.*.tmp')):
        try:
            os.remove(tmp)
        except OSError:
            pass


def save_checkpoint(path: str, *, model, optimizer, lr_scheduler, scaler, epoch: int,
                    max_accuracy: float, config, ema=None, keep: int = 0, unit: str = 'epoch',
                    extra: Optional[dict] = None) -> str:
    """The whole training state after ``epoch`` (the iteration, for ``unit`` 'iter'); ``model`` and
    ``ema`` are the unwrapped modules; ``max_accuracy`` is the best validation score so far (top-1,
    box AP or mIoU); ``extra`` adds entries of the task's own. Refuses non-finite weights. ``keep`` > 0:
    afterwards delete all but the ``keep`` newest checkpoints of the folder (the one just written is
    always kept)."""
    _check_finite(model, 'model', epoch)
    if ema is not None:
        _check_finite(ema, 'EMA', epoch)
    _remove_stale_temporaries(os.path.dirname(os.path.abspath(path)))
    state = {
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': lr_scheduler.state_dict(),
        'scaler': scaler.state_dict(),
        'epoch': int(epoch),
        'max_accuracy': float(max_accuracy),
        'config': config.dump(),
        'rng': rng_state(),
    }
    if ema is not None:
        state['ema'] = ema.state_dict()
    state.update(extra or {})
    _atomic_torch_save(state, path, epoch)
    if keep > 0:
        prune_checkpoints(os.path.dirname(os.path.abspath(path)), keep, newest=epoch, unit=unit)
    return path


def _checkpoints(output_dir: str, unit: str = 'epoch') -> List[tuple]:
    """(position, path) of the ckpt_<unit>_<N>.pth files in ``output_dir``, newest first."""
    if unit not in CHECKPOINT_UNITS:
        raise ValueError(f'checkpoint unit {unit!r}; expected one of {CHECKPOINT_UNITS}')
    pattern = re.compile(rf'^ckpt_{unit}_(\d+)\.pth$')
    found = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), f'ckpt_{unit}_*.pth')):
        m = pattern.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def prune_checkpoints(output_dir: str, keep: int, newest: int, unit: str = 'epoch'):
    """Delete checkpoints older than position ``newest`` (just written, complete) beyond the ``keep``
    newest. Files of later positions (left by another run) are not this run's to judge, and stay."""
    older = [path for position, path in _checkpoints(output_dir, unit) if position < newest]
    for path in older[max(0, keep - 1):]:
        os.remove(path)
        logger.info(f'removed {path} (SAVE_KEEP {keep})')


def read_checkpoint(path: str, *, mmap: bool = False) -> dict:
    """The checkpoint's contents, read with torch.load(weights_only=True): nothing in it is executed.
    Official training checkpoints (whose config is a pickled yacs node) are read too. ``mmap`` maps
    the tensors instead of reading them (they stay tied to the file: only for a look)."""
    from models.pretrained import CheckpointError, read_state_file
    if not os.path.isfile(path):
        raise UserError(f'checkpoint not found: {path}')
    try:
        return read_state_file(path, map_location='cpu', mmap=mmap)
    except CheckpointError as e:  # truncated, foreign or code-carrying: the message says which
        raise UserError(str(e)) from None


def _load_strict(module, state_dict, what: str, path: str):
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        detail = ' '.join(line.strip() for line in str(e).splitlines()[1:3])
        raise UserError(f'checkpoint {path} does not fit the {what}: {detail[:500]}') from None


def load_checkpoint(path: str, *, model, optimizer=None, lr_scheduler=None, scaler=None,
                    ema=None) -> dict:
    """Load what ``path`` holds into the given objects (those left None are skipped); return
    {'epoch', 'max_accuracy', 'config', 'has_training_state', 'entries'}. The model is loaded strictly."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        raise UserError(f'{path} is not a training checkpoint (no "model" entry); '
                        f'use --pretrained to start from released weights in another layout')
    _load_strict(model, ckpt['model'], 'model', path)
    training_state = all(k in ckpt for k in ('optimizer', 'lr_scheduler', 'epoch'))
    if training_state and optimizer is not None:
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f'checkpoint {path} does not fit the optimizer: {e}') from None
        if lr_scheduler is not None:
            lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
        if scaler is not None and ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        if 'rng' in ckpt:
            set_rng_state(ckpt['rng'])
    if ema is not None and 'ema' in ckpt:
        _load_strict(ema, ckpt['ema'], 'EMA model', path)
    return {
        'epoch': int(ckpt.get('epoch', -1)),
        'max_accuracy': float(ckpt.get('max_accuracy', 0.0)),
        'config': ckpt.get('config'),
        'has_training_state': training_state,
        'entries': ckpt,  # everything the file holds, for a task's own extra entries
    }


def auto_resume_file(output_dir: str, unit: str = 'epoch') -> Optional[str]:
    """The newest readable checkpoint in ``output_dir``, or None. This run writes files whole (renamed
    into place when complete), but a file truncated or damaged by other means, or one that a
    weights-only load refuses, is passed over with a warning in favour of the one before."""
    for _, path in _checkpoints(output_dir, unit):
        try:
            read_checkpoint(path, mmap=True)  # a look, not a read: the load reads it afterwards
        except UserError as e:
            reason = str(e)[len(path) + 2:] if str(e).startswith(f'{path}: ') else str(e)
            logger.warning(f'auto-resume: passing over {path}: {reason}')
            continue
        return path
    return None
