"""Distributed setup, random seeds, metric reduction, and the one save and one load of a checkpoint."""
import datetime
import errno
import glob
import logging
import math
import os
import random
import re
import socket
import time
from collections.abc import Mapping
from typing import List, Optional, Tuple

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
    if ('RANK' in os.environ or 'WORLD_SIZE' in os.environ) and not is_distributed():
        _check_launch_environment()
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        kwargs = {'device_id': device} if device.type == 'cuda' else {}
        dist.init_process_group(backend=backend, init_method='env://',
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return device


def _check_launch_environment():
    """A process group needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a half-set environment
    would otherwise end in a rendezvous error or a wait until the timeout."""
    names = ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        given = ', '.join(f'{n}={os.environ[n]}' for n in names if os.environ.get(n))
        raise UserError(f'{given} set but not {", ".join(missing)}: start the processes with torchrun '
                        f'(which sets all four), or unset RANK and WORLD_SIZE to run one process')
    values = {}
    for name in ('RANK', 'WORLD_SIZE', 'MASTER_PORT'):
        try:
            values[name] = int(os.environ[name])
        except ValueError:
            raise UserError(f'{name}={os.environ[name]!r} is not a whole number') from None
    if not 0 <= values['RANK'] < values['WORLD_SIZE']:
        raise UserError(f'RANK={values["RANK"]} must be from 0 to WORLD_SIZE - 1 = {values["WORLD_SIZE"] - 1}')


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


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that depends only on ``keys``, such as (seed, epoch, rank), so that epoch E of a
    resumed run draws the same random numbers as epoch E of an uninterrupted one."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


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


def _no_space(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC))


def _host() -> str:
    return socket.gethostname().replace('.', '-') or 'host'


def _atomic_torch_save(obj, path: str, epoch: int = -1):
    """Write to a temporary file in the same folder, flush it to disk, then rename it over ``path``:
    a reader sees the old file or the complete new one, never a partial one. The temporary file is
    named after this host and process, so that no other process takes it for a dead one's."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.{_host()}.{os.getpid()}.tmp')
    try:
        try:
            with open(tmp, 'wb') as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk, a quota, a file system gone away
            what = f'no space left on the device of {directory}' if _no_space(e) else str(e.strerror or e)
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


# A temporary file of another host is taken for a dead save's when it has not been written to for this
# long; one of this host is judged by whether its process still lives.
STALE_AFTER_S = 300


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
            if host in (None, _host()):
                if process_alive(pid) and pid != os.getpid():
                    continue
            elif time.time() - os.path.getmtime(tmp) < STALE_AFTER_S:
                continue
            os.remove(tmp)
        except OSError:
            pass


def save_checkpoint(path: str, *, model, optimizer, lr_scheduler, scaler, epoch: int,
                    max_accuracy: float, config, ema=None, keep: int = 0, unit: str = 'epoch',
                    extra: Optional[dict] = None) -> str:
    """The whole training state after ``epoch`` (the iteration, for ``unit`` 'iter'); ``model`` and
    ``ema`` are the unwrapped modules; ``max_accuracy`` is the best validation score so far (top-1,
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
        'max_accuracy': float(max_accuracy),
        'config': config.dump(),
        'rng': rng_state(),
    }
    if ema is not None:
        state['ema'] = ema.state_dict()
    state.update(extra or {})
    _atomic_torch_save(state, path, epoch)
    written = _order(path)
    if written is not None:
        for order, old in _checkpoints(directory, unit):
            if order < written and order[1] != _COMPLETE:
                os.remove(old)
    if keep > 0 and written is not None and written[1] == _COMPLETE:
        prune_checkpoints(directory, keep, newest=written[0], unit=unit)
    return path


def _checkpoints(output_dir: str, unit: str = 'epoch') -> List[tuple]:
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
    older = [path for (position, step), path in _checkpoints(output_dir, unit)
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


def ensure_writable_dir(folder: str, probe: bool = True):
    """Create the output folder, and (``probe``) write to it once: a path through a file, a folder
    without write permission or a full disk is found before any work, in one line."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in _ancestors(folder) if os.path.exists(p) and not os.path.isdir(p)), None)
        why = f'{blocker} is a file, not a folder' if blocker else e.strerror or str(e)
        raise UserError(f'cannot create the output folder {folder}: {why}') from None
    if not probe:
        return
    probe = os.path.join(folder, f'.write_test.{_host()}.{os.getpid()}')
    try:
        with open(probe, 'wb') as f:
            f.write(b'0' * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        why = 'no space left on the device' if _no_space(e) else e.strerror or str(e)
        raise UserError(f'cannot write to the output folder {folder}: {why}') from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def _ancestors(path: str) -> List[str]:
    path = os.path.abspath(path)
    chain = [path]
    while os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    return chain[::-1]


def all_finite(module) -> bool:
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


def check_weights_path(path: str):
    """A save_pretrained folder's shard index must name shard files of that folder; checked before
    the loader follows it."""
    if not os.path.isdir(path):
        return
    import json
    for index in glob.glob(os.path.join(glob.escape(path), '*.index.json')):
        try:
            with open(index, encoding='utf-8') as f:
                weight_map = json.load(f).get('weight_map')
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f'{index}: not a readable shard index ({type(e).__name__}: {e})') from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f'{index}: "weight_map" must map tensor names to shard files; got '
                            f'{type(weight_map).__name__}')
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ('.', '..'):
                raise UserError(f'{index}: the shard of {name} is {shard!r}; expected a file name in '
                                f'{path}')
            if not os.path.isfile(os.path.join(path, shard)):
                raise UserError(f'{index}: the shard {shard} of {name} is not in {path}')


# ---------------------------------------------------------------------------------------------------
# What a checkpoint holds, checked entry by entry before anything is loaded from it.
# ---------------------------------------------------------------------------------------------------

class CheckpointEntryError(UserError):
    """A checkpoint that reads but holds something unusable; the message names the file and entry."""


def _check_tensors(state, path: str, entry: str):
    """A state dict of dense tensors with data, finite where floating point."""
    if not isinstance(state, Mapping):
        raise CheckpointEntryError(f'{path}: the "{entry}" entry is a {type(state).__name__}, not a '
                                   f'state dict of tensors')
    for key, tensor in state.items():
        where = f'{path}: "{entry}" entry {key}'
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointEntryError(f'{where} is a {type(tensor).__name__}, not a tensor')
        if tensor.layout != torch.strided:
            raise CheckpointEntryError(f'{where} is a {tensor.layout} tensor; a checkpoint holds dense tensors')
        if tensor.is_meta:
            raise CheckpointEntryError(f'{where} holds no data (a meta tensor, saved from a model '
                                       f'that was never materialised)')
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointEntryError(f'{where} has {bad} non-finite value(s) (NaN or inf); refusing '
                                       f'to load weights that are not finite')


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_rng(state, path: str, entry: str = 'rng'):
    """Applying the states is the exact test of their form; the current states are put back."""
    current = rng_state()
    try:
        set_rng_state(state)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
        raise CheckpointEntryError(f'{path}: the "{entry}" entry is not a set of random-generator '
                                   f'states ({type(e).__name__}: {e})') from None
    finally:
        set_rng_state(current)


def check_checkpoint(ckpt, path: str, *, training: bool):
    """Raise a CheckpointEntryError naming the first unusable entry: the model (and EMA) weights for any
    use, and for resuming training also the optimizer, epoch, best accuracy, scaler, random states
    and the mid-epoch position. Entries another program wrote and this one does not use are not
    judged."""
    if not isinstance(ckpt, Mapping) or 'model' not in ckpt:
        raise UserError(f'{path} is not a training checkpoint (no "model" entry); '
                        f'use --pretrained to start from released weights in another layout')
    _check_tensors(ckpt['model'], path, 'model')
    if 'ema' in ckpt:
        _check_tensors(ckpt['ema'], path, 'ema')
    if not training or not all(k in ckpt for k in ('optimizer', 'epoch')):
        return
    optimizer = ckpt['optimizer']
    if not (isinstance(optimizer, Mapping) and isinstance(optimizer.get('state'), Mapping)
            and isinstance(optimizer.get('param_groups'), (list, tuple))
            and all(isinstance(g, Mapping) and isinstance(g.get('params'), (list, tuple))
                    for g in optimizer['param_groups'])):
        raise CheckpointEntryError(f'{path}: the "optimizer" entry is not an optimizer state '
                                   f'(a dict with "state" and a list of "param_groups")')
    for state in optimizer['state'].values():
        if isinstance(state, Mapping):
            _check_tensors({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, path,
                           'optimizer')
    epoch = ckpt['epoch']
    if not _whole(epoch) or epoch < -1:
        raise CheckpointEntryError(f'{path}: the "epoch" entry is {epoch!r}; expected a whole number >= -1')
    best = ckpt.get('max_accuracy', 0.0)
    if isinstance(best, torch.Tensor) and best.numel() == 1:
        best = best.item()
    if isinstance(best, bool) or not isinstance(best, (int, float)) or not math.isfinite(best):
        raise CheckpointEntryError(f'{path}: the "max_accuracy" entry is {best!r}; expected a finite number')
    scaler = ckpt.get('scaler')
    if scaler is not None and not (isinstance(scaler, Mapping) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in scaler.values())):
        raise CheckpointEntryError(f'{path}: the "scaler" entry is not a gradient-scaler state '
                                   f'(a dict of numbers)')
    if 'rng' in ckpt:
        _check_rng(ckpt['rng'], path)
    if 'position' in ckpt:
        _check_position(ckpt['position'], path, epoch)


def _check_position(position, path: str, epoch: int):
    keys = {'epoch': _whole, 'step': _whole, 'steps_per_epoch': _whole, 'updates': _whole,
            'loss_sum': lambda v: isinstance(v, float) and math.isfinite(v),
            'norm_sum': lambda v: isinstance(v, float) and math.isfinite(v),
            'layout': lambda v: isinstance(v, Mapping),
            'rng': lambda v: isinstance(v, (list, tuple)) and len(v) > 0}
    if not isinstance(position, Mapping) or set(keys) - set(position):
        raise CheckpointEntryError(f'{path}: the "position" entry is not a mid-epoch position '
                                   f'(a dict with {", ".join(keys)})')
    bad = [k for k, ok in keys.items() if not ok(position[k])]
    if bad or position['epoch'] != epoch + 1 or not 0 <= position['step'] <= position['steps_per_epoch']:
        shown = bad[0] if bad else 'epoch' if position['epoch'] != epoch + 1 else 'step'
        raise CheckpointEntryError(f'{path}: the "position" entry has a bad {shown!r}: '
                                   f'{position[shown]!r}')
    for i, state in enumerate(position['rng']):
        _check_rng(state, path, f'position.rng[{i}]')


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------

_SHOWN = 10


def _listing(items: List[str]) -> str:
    more = [f'... and {len(items) - _SHOWN} more'] if len(items) > _SHOWN else []
    return '\n    ' + '\n    '.join(items[:_SHOWN] + more)


def fit_problems(file_state: Mapping, model_state: Mapping) -> List[str]:
    """What keeps ``file_state`` from loading strictly into a model with ``model_state``: counts, then
    the keys with their shapes (the first ten of each kind, and how many more), as load_pretrained
    reports them."""
    def shape(t) -> str:
        return str(list(t.shape))

    missing = [f'{k} {shape(v)}' for k, v in model_state.items() if k not in file_state]
    unexpected = [f'{k} {shape(v)}' for k, v in file_state.items() if k not in model_state]
    other = [f'{k} file {shape(file_state[k])} vs model {shape(v)}' for k, v in model_state.items()
             if k in file_state and file_state[k].shape != v.shape]
    problems = []
    for count, what in ((missing, 'missing from the file'), (unexpected, 'unexpected in the file'),
                        (other, 'of another shape')):
        if count:
            problems.append(f'{len(count)} {what}:{_listing(count)}')
    return problems


def _load_strict(module, state_dict, what: str, path: str):
    problems = fit_problems(state_dict, module.state_dict())
    if problems:
        raise UserError(f'checkpoint {path} does not fit the {what}:\n  ' + '\n  '.join(problems)
                        + '\n  (was it trained with another config? give the --cfg and --opts it was '
                          'trained with; its config is stored in the checkpoint and in config.yaml)')
    module.load_state_dict(state_dict, strict=True)


def load_checkpoint(path: str, *, model, optimizer=None, lr_scheduler=None, scaler=None,
                    ema=None, ckpt: Optional[Mapping] = None) -> dict:
    """Load what ``path`` holds (or ``ckpt``, already read from it) into the given objects (those left
    None are skipped); return {'epoch', 'max_accuracy', 'config', 'has_training_state', 'entries'}.
    Every entry used is checked before anything is loaded; the model is loaded strictly.

    The learning-rate schedule is not taken from the file: it is a function of the current config and
    the step (lr_scheduler.py), so a run resumed with a longer TRAIN.EPOCHS follows the longer
    schedule. The optimizer keeps its state (moments) from the file and its hyperparameters (weight
    decay, betas, ...) from the current config. ``lr_scheduler`` is accepted for callers of the
    older signature and left alone."""
    if ckpt is None:
        ckpt = read_checkpoint(path)
    training = optimizer is not None
    check_checkpoint(ckpt, path, training=training)
    _load_strict(model, ckpt['model'], 'model', path)
    if ema is not None and 'ema' in ckpt:
        _load_strict(ema, ckpt['ema'], 'EMA model', path)
    elif ema is not None:  # a checkpoint of a run without EMA: the average starts from its weights
        ema.load_state_dict(model.state_dict())
    training_state = all(k in ckpt for k in ('optimizer', 'epoch'))
    if training_state and optimizer is not None:
        settings = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise UserError(f'checkpoint {path} does not fit the optimizer ({type(e).__name__}: {e}); '
                            f'was it trained with another TRAIN.OPTIMIZER.NAME or model?') from None
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
        if scaler is not None and ckpt.get('scaler'):
            if scaler.is_enabled():
                scaler.load_state_dict(ckpt['scaler'])
        if 'rng' in ckpt:
            set_rng_state(ckpt['rng'])
    return {
        'epoch': int(ckpt.get('epoch', -1)),
        'max_accuracy': float(ckpt.get('max_accuracy', 0.0)),
        'config': ckpt.get('config'),
        'has_training_state': training_state,
        'entries': ckpt,  # everything the file holds, for a task's own extra entries
    }


def find_resume_checkpoint(output_dir: str, unit: str = 'epoch') -> Optional[Tuple[str, Mapping]]:
    """(path, contents) of the newest usable checkpoint in ``output_dir``, or None. This run writes
    files whole (renamed into place when complete), but a file truncated or damaged by other means,
    one that a weights-only load refuses, or one with an unusable entry (non-finite weights, a bad
    epoch, ...) is passed over with a warning in favour of the one before. The contents are memory
    mapped: read once, by the checks and the load."""
    for _, path in _checkpoints(output_dir, unit):
        try:
            ckpt = read_checkpoint(path, mmap=True)
            check_checkpoint(ckpt, path, training=True)
        except UserError as e:
            reason = str(e)[len(path) + 2:] if str(e).startswith(f'{path}: ') else str(e)
            logger.warning(f'auto-resume: passing over {path}: {reason}')
            continue
        return path, ckpt
    return None


def auto_resume_file(output_dir: str, unit: str = 'epoch') -> Optional[str]:
    """The path of :func:`find_resume_checkpoint`."""
    found = find_resume_checkpoint(output_dir, unit)
    return found[0] if found else None
