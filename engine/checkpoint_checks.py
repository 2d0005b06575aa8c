"""What a checkpoint holds, checked entry by entry before anything is loaded from it."""
import math
from collections.abc import Mapping

import torch

from errors import UserError

from .seed import rng_state, set_rng_state


class CheckpointEntryError(UserError):
    """A checkpoint that reads but holds something unusable; the message names the file and entry."""


# More elements than any tensor of these models holds by far (the largest, FocalNet-H's 21841-class
# classifier, has about 6 x 10^7): a tensor beyond it comes from a damaged or crafted file, and reading it whole
# (to check it is finite, or to load it) could take all the memory there is.
MAX_ELEMENTS = 2 ** 31


def _check_extent(tensor: torch.Tensor, where: str):
    """The tensor's shape against its storage, from the sizes alone (nothing is allocated or read): a
    view that claims more elements than its storage holds (a stride-0 expansion saved in place of
    data) or an absurd element count is refused before anything touches its values."""
    count = tensor.numel()
    if count > MAX_ELEMENTS:
        raise CheckpointEntryError(f'{where} has shape {list(tensor.shape)} ({count:.3g} elements, more '
                                   f'than the {MAX_ELEMENTS:.3g} any model here holds); refusing it')
    need = count * tensor.element_size()
    have = tensor.untyped_storage().nbytes() - tensor.storage_offset() * tensor.element_size()
    if count and have < need:
        raise CheckpointEntryError(f'{where} has shape {list(tensor.shape)} ({need} bytes) but its storage '
                                   f'holds {max(have, 0)} bytes (an expanded or overlapping view, not '
                                   f'data); refusing it')


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
        _check_extent(tensor, where)
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
    use, and for resuming training also the optimizer, epoch, best score, scaler, random states
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
    # The best score so far; 'max_accuracy' is its name in the official checkpoints and in ours of
    # classification, which keep it for the official code.
    for entry in ('best_score', 'max_accuracy'):
        best = ckpt.get(entry, 0.0)
        if isinstance(best, torch.Tensor) and best.numel() == 1:
            best = best.item()
        if isinstance(best, bool) or not isinstance(best, (int, float)) or not math.isfinite(best):
            raise CheckpointEntryError(f'{path}: the "{entry}" entry is {best!r}; expected a finite number')
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


def check_optimizer_fits(saved, optimizer, path: str):
    """The optimizer state of a checkpoint against the optimizer built for this model, before it is
    loaded: torch loads moments of another shape without a word, and the first step then fails deep
    inside the update. The groups, their sizes and every per-parameter tensor's shape must match."""
    groups = optimizer.param_groups
    if len(saved['param_groups']) != len(groups):
        raise CheckpointEntryError(f'{path}: the "optimizer" entry has {len(saved["param_groups"])} '
                                   f'parameter group(s); this model\'s optimizer has {len(groups)}')
    for number, (kept, group) in enumerate(zip(saved['param_groups'], groups)):
        if len(kept['params']) != len(group['params']):
            raise CheckpointEntryError(f'{path}: the "optimizer" entry\'s group {number} has '
                                       f'{len(kept["params"])} parameters; this model\'s has '
                                       f'{len(group["params"])}')
        for index, param in zip(kept['params'], group['params']):
            state = saved['state'].get(index, {})
            for name, value in (state.items() if isinstance(state, Mapping) else ()):
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise CheckpointEntryError(
                        f'{path}: the "optimizer" entry\'s {name} of parameter {index} has shape '
                        f'{list(value.shape)}; the parameter has {list(param.shape)}')
