"""Starting a run, the same for every task: the process group, the same config on every process, the
output folder (locked for a training run, probed writable before any work), the logger, and the
config written to the folder."""
import logging
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from config import defaults, output_dir, with_num_classes
from errors import UserError
from logger import NAME as LOGGER_NAME, create_logger
from lr_scheduler import describe_lr, lr_scale
from optimizer import build_optimizer
from utils import get_rank, get_world_size, init_distributed

from .amp import make_scaler
from .config_merge import RUN_KEYS, config_differences
from .ddp import check_same_config
from .folders import ensure_writable_dir
from .lock import RunLock
from .seed import seed_everything

logger = logging.getLogger(LOGGER_NAME)


@dataclass
class Started:
    device: torch.device
    out: str             # the output folder, <OUTPUT>/<MODEL.NAME>/<TAG>
    rank: int


@contextmanager
def start_run(config, local_rank=None, *, training: bool) -> Iterator[Started]:
    """``with start_run(config, args.local_rank, training=...) as run:`` around a task's work. A
    training run holds the output folder's lock for its whole length (a second run on the folder stops
    before it writes anything); an evaluation writes no checkpoints and holds none."""
    device = init_distributed(local_rank, config.DIST_TIMEOUT)
    check_same_config(config)
    out = output_dir(config)
    with ExitStack() as stack:
        note = ''
        if training:  # taken before anything is written to the folder
            note = stack.enter_context(RunLock(out)).note
        ensure_writable_dir(out)
        rank = get_rank()
        create_logger(out, rank)
        if note:
            logger.warning(note)
        logger.info(f'rank {rank} of {get_world_size()} on {device}')
        yield Started(device, out, rank)


def settle_config(config, out: str, num_classes: int, source: str = ''):
    """The final config of a run, once the data is read: MODEL.NUM_CLASSES set to the data's
    ``num_classes`` (``source`` says where they come from, for the log), written down
    (:func:`record_config`); the generators are then seeded so that every process builds the same
    initial weights."""
    if num_classes != config.MODEL.NUM_CLASSES:
        logger.info(f'MODEL.NUM_CLASSES: {num_classes} ({source}; the config said {config.MODEL.NUM_CLASSES})')
    config = with_num_classes(config, num_classes)
    record_config(config, out)
    seed_everything(config.SEED)
    return config


def record_config(config, out: str):
    """Write the final config to the output folder (config.yaml for training; config_eval.yaml for an
    evaluation, which leaves the training run's alone) and log all of it to the log file; the console
    gets the keys that differ from the defaults."""
    name = 'config_eval.yaml' if config.EVAL_MODE else 'config.yaml'
    path = os.path.join(out, name)
    if get_rank() == 0:
        with open(path, 'w') as f:
            f.write(config.dump())
    logger.info(f'config:\n{config.dump()}', extra={'file_only': True})
    changed = [f'{k}={b!r}' for k, _, b in config_differences(defaults().dump(), config)]
    shown = ', '.join(changed[:12]) + (f' and {len(changed) - 12} more' if len(changed) > 12 else '')
    logger.info(f'config: {len(changed)} key(s) differ from the defaults: {shown or "none"} '
                f'(all of it in {path})')
    if config.EVAL_MODE and config.MODEL.RESUME:
        _warn_eval_changes(config)




def _warn_eval_changes(config):
    """An evaluation of a training checkpoint starts from the config stored in it (config.get_config);
    say which keys the command changed."""
    from config import stored_config
    text = stored_config(config.MODEL.RESUME)
    if text is None:
        return
    changed = [f'{k} {a!r} -> {b!r}' for k, a, b in config_differences(text, config) if k not in RUN_KEYS]
    if changed:
        more = f' and {len(changed) - 10} more' if len(changed) > 10 else ''
        logger.warning(f'evaluating with {len(changed)} key(s) other than {config.MODEL.RESUME} was '
                       f'trained with: ' + '; '.join(changed[:10]) + more)


def build_or_explain(build: Callable, *args, what: str):
    """``build(*args)``; a model the config cannot describe (a builder's ValueError or TypeError) is a
    one-line error naming ``what`` was asked for."""
    try:
        return build(*args)
    except (ValueError, TypeError) as e:
        raise UserError(f'the config does not describe a valid {what}: {e}') from None


def build_optimization(config, model, device, dtype, build_schedule: Callable, groups=None):
    """(optimizer, scheduler, scaler) of a training run, the same way for every task: the rates scaled
    with the global batch (lr_scheduler.lr_scale) and logged, the task's schedule built by
    ``build_schedule(optimizer, scale)``, a gradient scaler for float16. ``model`` is the bare model;
    ``groups``: the task's own parameter groups (optimizer.build_optimizer)."""
    world = get_world_size()
    scale = lr_scale(config, world)
    optimizer = build_optimizer(config, model, scale, groups)
    scheduler = build_schedule(optimizer, scale)
    logger.info(describe_lr(config, world))
    return optimizer, scheduler, make_scaler(device, dtype)
