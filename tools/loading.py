"""The model a command-line tool asks for: a config (a file, or a release name), its overrides, and
weights in any layout ``models.load_pretrained`` reads, and the device it runs on. Shared by the
command-line tools and the demo.
"""
import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from yacs.config import CfgNode

from config import load_config
from data.files import file_problem
from errors import UserError
from models import FocalNet, build_model, list_models, load_pretrained
from models.pretrained import CheckpointError, convert_state_dict, read_state_file

logger = logging.getLogger('focalnet.tools')

ROOT = Path(__file__).resolve().parents[1]


def device_from_flag(name: str, flag: str = '--device') -> torch.device:
    """The torch.device a ``--device`` value names; a UserError for a bad name or a CUDA device on a
    machine without CUDA."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f'bad {flag} {name!r}: {e}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'{flag} {name}: CUDA is not available on this machine')
    return device


def check_img_size(value: Optional[int], flag: str = '--img-size'):
    """A resolution flag held to DATA.IMG_SIZE's range, named as the flag the user typed."""
    from engine.config_checks import RULES
    rule = RULES['DATA.IMG_SIZE']
    if value is not None and not rule.ok(value):
        raise UserError(f'{flag} must be {rule.allowed}; got {value}')


def config_path(cfg: Optional[str], model: Optional[str]) -> str:
    """The config file of ``--cfg``, or of ``--model NAME`` (configs/NAME.yaml)."""
    if cfg and model:
        raise UserError('give either --cfg or --model, not both')
    if model:
        if model not in list_models():
            raise UserError(f'unknown model {model!r}; known models: {", ".join(list_models())}')
        return str(ROOT / 'configs' / f'{model}.yaml')
    if not cfg:
        raise UserError('say which model: --model NAME (a release, e.g. focalnet_tiny_srf) or '
                        '--cfg CONFIG.yaml')
    return cfg


def checkpoint_classes(path: str) -> Optional[int]:
    """Rows of the classifier in a weight file (any layout), or None for a backbone-only file."""
    try:
        state, _ = convert_state_dict(read_state_file(path, mmap=True))
    except CheckpointError as e:
        raise UserError(f'cannot read {path}: {e}') from None
    head = state.get('head.weight')
    return None if head is None else int(head.shape[0])


def _sets(opts: Sequence[str], key: str) -> bool:
    return key in list(opts)[0::2]


def load_model(cfg: Optional[str], model: Optional[str], checkpoint: Optional[str],
               opts: Sequence[str] = ()) -> Tuple[CfgNode, FocalNet, Optional[dict]]:
    """(config, model in eval mode, load report or None).

    The number of classes follows the checkpoint's classifier unless ``--opts MODEL.NUM_CLASSES``
    says otherwise, so a 22K checkpoint works with a 1K config. Without a checkpoint the weights are
    random (seeded with SEED) and a warning says so.
    """
    opts = list(opts)
    if len(opts) % 2:
        raise UserError(f'--opts takes KEY VALUE pairs; got {len(opts)} words: {" ".join(opts)}')
    path = config_path(cfg, model)
    config = load_config(path, opts)
    if checkpoint and file_problem(checkpoint, 'checkpoint'):
        raise UserError(file_problem(checkpoint, 'checkpoint'))
    if checkpoint and not _sets(opts, 'MODEL.NUM_CLASSES'):
        classes = checkpoint_classes(checkpoint)
        if classes is not None and classes != config.MODEL.NUM_CLASSES:
            logger.info('the checkpoint has %d classes (the config %d); using %d',
                        classes, config.MODEL.NUM_CLASSES, classes)
            config = load_config(path, opts + ['MODEL.NUM_CLASSES', str(classes)])
    torch.manual_seed(config.SEED)
    net = build_model(config)
    report = None
    if checkpoint:
        try:
            report = load_pretrained(net, checkpoint)
        except CheckpointError as e:
            raise UserError(f'cannot load {checkpoint}: {e}\n(the config and --opts must describe the '
                            'architecture of the checkpoint)') from None
        logger.info('loaded %s (%s layout)', checkpoint, report['layout'])
    else:
        logger.warning('no checkpoint given: %s has random weights', config.MODEL.NAME)
    return config, net.eval(), report


def opts_from_flags(opts: Sequence[str], img_size: Optional[int] = None) -> List[str]:
    """--opts followed by the named flags, which take precedence."""
    opts = list(opts)
    if img_size is not None:
        opts += ['DATA.IMG_SIZE', str(img_size)]
    return opts
