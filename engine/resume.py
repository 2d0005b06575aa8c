"""Loading a checkpoint into the model (and the training state), and finding the one to resume from."""
import logging
from collections.abc import Mapping
from typing import List, Optional, Tuple

from errors import UserError

from .checkpoint import list_checkpoints, read_checkpoint
from .checkpoint_checks import check_checkpoint
from .seed import set_rng_state

logger = logging.getLogger('focalnet')

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
    for _, path in list_checkpoints(output_dir, unit):
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
