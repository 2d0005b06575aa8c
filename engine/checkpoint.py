"""Checkpoint files: named by the position they were saved at, written whole or not at all, pruned,
and read without executing code."""
import glob
import logging
import math
import os
import re
import time
from typing import List, Optional

import torch

import faults
from errors import TrainingStopped, UserError
from utils import all_reduce_sum, get_rank

from .folders import STALE_AFTER_S, host_tag, no_space, process_alive
from .seed import rng_state

logger = logging.getLogger('focalnet')

# Checkpoints are named by the position they were saved at: ckpt_epoch_<N>.pth after epoch N of an
# epoch-based run (classification, detection), ckpt_iter_<N>.pth for iteration-based ones
# (segmentation), and ckpt_epoch_<N>_step_<S>.pth part-way through epoch N, after S of its steps (a
# stop on a signal, or a periodic save).
CHECKPOINT_UNITS = ('epoch', 'iter')
_CHECKPOINT_NAME = re.compile(r'^ckpt_(epoch|iter)_(\d+)(?:_step_(\d+))?\.pth$')
_COMPLETE = math.inf  # the step of a checkpoint written at the end of its epoch: after any mid-epoch one


def checkpoint_path(output_dir: str, position: int, unit: str = 'epoch', step: Optional[int] = None) -> str:
    """The file of position ``position``; ``step``: a checkpoint part-way through epoch ``position``."""
    suffix = '' if step is None else f'_step_{step}'
    return os.path.join(output_dir, f'ckpt_{unit}_{position}{suffix}.pth')


def _order(path: str) -> Optional[tuple]:
    """(position, step) of a checkpoint's name, step infinite for a complete epoch; None for other files."""
    m = _CHECKPOINT_NAME.match(os.path.basename(path))
    if not m:
        return None
    return int(m.group(2)), _COMPLETE if m.group(3) is None else int(m.group(3))


def _atomic_torch_save(obj, path: str, epoch: int = -1):
    """Write to a temporary file in the same folder, flush it to disk, then rename it over ``path``:
    a reader sees the old file or the complete new one, never a partial one. The temporary file is
    named after this host and process, so that no other process takes it for a dead one's."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.{host_tag()}.{os.getpid()}.tmp')
    try:
        try:
            with open(tmp, 'wb') as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk, a quota, a file system gone away
            what = f'no space left on the device of {directory}' if no_space(e) else str(e.strerror or e)
            raise TrainingStopped(f'cannot write the checkpoint {path}: {what}; the checkpoints already '
                                  f'in the folder are intact') from None
        except RuntimeError as e:  # torch reports some write failures this way
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


def all_finite(module) -> bool:
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


def _remove_stale_temporaries(directory: str):
    """Temporary files of saves that died before their rename (never complete). Those of a process
    that still runs, here or, recently written, on another host, are left alone."""
    pattern = re.compile(r'^\.ckpt_.+\.pth\.(?:(.+)\.)?(\d+)\.tmp$')
    for tmp in glob.glob(os.path.join(glob.escape(directory), '.ckpt_*.pth.*.tmp')):
        m = pattern.match(os.path.basename(tmp))
        if not m:
            continue
        host, pid = m.group(1), int(m.group(2))
        try:
            if host in (None, host_tag()):
                if process_alive(pid) and pid != os.getpid():
                    continue
            elif time.time() - os.path.getmtime(tmp) < STALE_AFTER_S:
                continue
            os.remove(tmp)
        except OSError:
            pass


def save_checkpoint(path: str, *, model, optimizer, lr_scheduler, scaler, epoch: int,
                    best_score: float, config, ema=None, keep: int = 0, unit: str = 'epoch',
                    extra: Optional[dict] = None) -> str:
    """The whole training state after ``epoch`` (the iteration, for ``unit`` 'iter'); ``model`` and
    ``ema`` are the unwrapped modules; ``best_score`` is the best validation score so far (top-1,
    box AP or mIoU); ``extra`` adds entries of the task's own (a mid-epoch checkpoint its
    'position'). Refuses non-finite weights. ``keep`` > 0: afterwards delete all but the ``keep``
    newest end-of-epoch checkpoints of the folder (the one just written is always kept). Mid-epoch
    checkpoints older than the one written are deleted: only the newest is of use."""
    _check_finite(model, 'model', epoch)
    if ema is not None:
        _check_finite(ema, 'EMA', epoch)
    directory = os.path.dirname(os.path.abspath(path))
    _remove_stale_temporaries(directory)
    state = {
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': lr_scheduler.state_dict(),
        'scaler': scaler.state_dict(),
        'epoch': int(epoch),
        'best_score': float(best_score),
        'config': config.dump(),
        'rng': rng_state(),
    }
    if ema is not None:
        state['ema'] = ema.state_dict()
    state.update(extra or {})
    _atomic_torch_save(state, path, epoch)
    written = _order(path)
    if written is not None:
        for order, old in list_checkpoints(directory, unit):
            if order < written and order[1] != _COMPLETE:
                os.remove(old)
    if keep > 0 and written is not None and written[1] == _COMPLETE:
        prune_checkpoints(directory, keep, newest=written[0], unit=unit)
    return path


def list_checkpoints(output_dir: str, unit: str = 'epoch') -> List[tuple]:
    """((position, step), path) of the checkpoints of ``unit`` in ``output_dir``, newest first; step
    is infinite for a complete epoch."""
    if unit not in CHECKPOINT_UNITS:
        raise ValueError(f'checkpoint unit {unit!r}; expected one of {CHECKPOINT_UNITS}')
    found = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), f'ckpt_{unit}_*.pth')):
        order = _order(path)
        if order is not None:
            found.append((order, path))
    return sorted(found, reverse=True)


def prune_checkpoints(output_dir: str, keep: int, newest: int, unit: str = 'epoch'):
    """Delete end-of-epoch checkpoints older than position ``newest`` (just written, complete) beyond
    the ``keep`` newest. Files of later positions (left by another run) are not this run's to judge,
    and stay."""
    older = [path for (position, step), path in list_checkpoints(output_dir, unit)
             if position < newest and step == _COMPLETE]
    for path in older[max(0, keep - 1):]:
        os.remove(path)
        logger.info(f'removed {path} (SAVE_KEEP {keep})')


def read_checkpoint(path: str, *, mmap: bool = False) -> dict:
    """The checkpoint's contents, read with torch.load(weights_only=True): nothing in it is executed.
    Official training checkpoints (whose config is a pickled yacs node) are read too. ``mmap`` maps
    the tensors instead of reading them (they stay tied to the file)."""
    from models.pretrained import CheckpointError, read_state_file
    from data.files import file_problem
    problem = file_problem(path, 'checkpoint')
    if problem:
        raise UserError(problem)
    try:
        return read_state_file(path, map_location='cpu', mmap=mmap)
    except CheckpointError as e:  # truncated, foreign or code-carrying: the message says which
        raise UserError(str(e)) from None


def save_on_rank0(path: str, *, device, preemption=None, **state) -> Optional[str]:
    """:func:`save_checkpoint` by rank 0 (the others hold the same weights), then a barrier: no process
    goes on (or exits, on a stop) before the file is complete. ``preemption``: its periodic-save clock
    starts again. The path on rank 0, None on the others."""
    written = None
    if get_rank() == 0:
        written = save_checkpoint(path, **state)
        logger.info(f'saved {written}')
    all_reduce_sum(torch.zeros(1, device=device))
    if preemption is not None:
        preemption.saved()
    return written
