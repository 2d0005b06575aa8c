"""Loading a checkpoint into the model (and the training state), finding the one to resume from, and
both in one call (:func:`resume_or_load`)."""
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

from errors import UserError

from models.state_fit import fit_problems

from .checkpoint import list_checkpoints, read_checkpoint
from .checkpoint_checks import check_checkpoint, check_optimizer_fits
from .config_merge import config_differences
from .seed import set_rng_state

logger = logging.getLogger('focalnet')

def _load_strict(module, state_dict, what: str, path: str):
    problems = fit_problems(state_dict, module.state_dict())
    if problems:
        every = fit_problems(state_dict, module.state_dict(), shown=None)
        if any(isinstance(h, logging.FileHandler) for h in logger.handlers):  # a run's log file
            logger.error(f'checkpoint {path} does not fit the {what}; every key:\n  ' + '\n  '.join(every),
                         extra={'file_only': True})
        raise UserError(f'checkpoint {path} does not fit the {what}:\n  ' + '\n  '.join(problems)
                        + '\n  (was it trained with another config? give the --cfg and --opts it was '
                          'trained with; its config is stored in the checkpoint and in config.yaml)')
    module.load_state_dict(state_dict, strict=True)


def load_checkpoint(path: str, *, model, optimizer=None, lr_scheduler=None, scaler=None,
                    ema=None, ckpt: Optional[Mapping] = None) -> dict:
    """Load what ``path`` holds (or ``ckpt``, already read from it) into the given objects (those left
    None are skipped); return {'epoch', 'best_score', 'config', 'has_training_state', 'entries'}.
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
    training_state = all(k in ckpt for k in ('optimizer', 'epoch'))
    if training_state and optimizer is not None and not fit_problems(ckpt['model'], model.state_dict()):
        check_optimizer_fits(ckpt['optimizer'], optimizer, path)  # before anything is loaded
    _load_strict(model, ckpt['model'], 'model', path)
    if ema is not None and 'ema' in ckpt:
        _load_strict(ema, ckpt['ema'], 'EMA model', path)
    elif ema is not None:  # a checkpoint of a run without EMA: the average starts from its weights
        ema.load_state_dict(model.state_dict())
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
        # Older checkpoints (and the official ones) call the best score max_accuracy.
        'best_score': float(ckpt.get('best_score', ckpt.get('max_accuracy', 0.0))),
        'config': ckpt.get('config'),
        'has_training_state': training_state,
        'entries': ckpt,  # everything the file holds, for a task's own extra entries
    }


def find_resume_checkpoint(output_dir: str, unit: str = 'epoch', *, model=None,
                           optimizer=None) -> Optional[Tuple[str, Mapping]]:
    """(path, contents) of the newest usable checkpoint in ``output_dir``, or None. This run writes
    files whole (renamed into place when complete), but a file truncated or damaged by other means,
    one that a weights-only load refuses, or one with an unusable entry (non-finite weights, a bad
    epoch, a tensor larger than its storage, an optimizer state that does not fit ``model``'s
    ``optimizer``, ...) is passed over with a warning in favour of the one before. A model that does
    not fit is not a damaged file but another config: that is for the load to report. The contents
    are memory mapped: read once, by the checks and the load."""
    for _, path in list_checkpoints(output_dir, unit):
        try:
            ckpt = read_checkpoint(path, mmap=True)
            check_checkpoint(ckpt, path, training=True)
            if (optimizer is not None and 'optimizer' in ckpt
                    and not fit_problems(ckpt['model'], model.state_dict())):
                check_optimizer_fits(ckpt['optimizer'], optimizer, path)
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


@dataclass
class ResumePoint:
    """Where a training run starts: from ``path`` (None: from scratch or released weights)."""
    path: Optional[str]
    start: int                   # the first epoch (or iteration) to run
    best_score: float = 0.0      # the best validation score so far (top-1, box AP or mIoU)
    entries: Mapping = field(default_factory=dict)  # all the file holds, for a task's own entries
    has_training_state: bool = False


def resume_or_load(config, output_dir: str, *, model, optimizer, scaler=None, ema=None,
                   unit: str = 'epoch', load_weights: Optional[Callable[[], None]] = None) -> ResumePoint:
    """Find, check and load what a training run starts from, in one call. The newest usable checkpoint
    of ``output_dir`` when TRAIN.AUTO_RESUME is on (it wins over MODEL.RESUME, with a warning), else
    MODEL.RESUME; it is checked and loaded into ``model``, ``optimizer``, ``scaler`` and ``ema`` (the
    bare modules). Without a checkpoint, ``load_weights()`` (the task's way to load MODEL.PRETRAINED)
    is called when MODEL.PRETRAINED is set. ``start``: the epoch after the checkpoint's for ``unit``
    'epoch', its iteration for 'iter', else TRAIN.START_EPOCH (epochs) or 0 (iterations)."""
    fresh = config.TRAIN.START_EPOCH if unit == 'epoch' else 0
    path, ckpt = config.MODEL.RESUME, None
    if config.TRAIN.AUTO_RESUME:
        found = find_resume_checkpoint(output_dir, unit, model=model, optimizer=optimizer)
        if found:
            if path and os.path.abspath(path) != os.path.abspath(found[0]):
                logger.warning(f'auto-resume: using {found[0]} instead of {path}')
            path, ckpt = found
    if not path:
        if config.MODEL.PRETRAINED and load_weights is not None:
            load_weights()
        return ResumePoint(None, fresh)
    state = load_checkpoint(path, model=model, optimizer=optimizer, scaler=scaler, ema=ema, ckpt=ckpt)
    log_config_changes(state['config'], config, path)
    if not state['has_training_state']:
        logger.info(f'{path} holds weights only: training starts from them')
        return ResumePoint(path, fresh, entries=state['entries'])
    start = state['epoch'] + 1 if unit == 'epoch' else state['epoch']
    return ResumePoint(path, start, state['best_score'], state['entries'], True)


def log_config_changes(saved, config, path: str):
    """The current config governs a resumed run; say which keys differ from the checkpoint's."""
    if not isinstance(saved, str):  # an official checkpoint's pickled config: not compared
        return
    changed = [f'{k} {a!r} -> {b!r}' for k, a, b in config_differences(saved, config)
               if k not in ('MODEL.RESUME', 'TRAIN.AUTO_RESUME')]
    if changed:
        logger.info(f'the config differs from that of {path} in {len(changed)} key(s); the current '
                    f'values govern: ' + '; '.join(changed))
