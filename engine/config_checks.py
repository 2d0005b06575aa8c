"""What each config key allows, and the rules that tie keys together. Every value is first brought to
its default's type (engine/config_merge.py), then checked against the table here. A key without a
rule (a section added later) is checked for its type only, so new sections work before they have rules."""
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from yacs.config import CfgNode as CN

from errors import UserError


@dataclass(frozen=True)
class Rule:
    allowed: str                      # what the error message says is allowed
    ok: Callable[[Any], bool]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(low, what='an integer') -> Rule:
    return Rule(f'{what} >= {low}', lambda v: _number(v) and v >= low)


def _above(low) -> Rule:
    return Rule(f'a number > {low}', lambda v: _number(v) and v > low)


def _within(low, high, *, high_open=False) -> Rule:
    return Rule(f'a number in [{low}, {high}{")" if high_open else "]"}',
                lambda v: _number(v) and low <= v and (v < high if high_open else v <= high))


def _one_of(*choices) -> Rule:
    return Rule('one of ' + ', '.join(map(str, choices)), lambda v: v in choices)


def _each(rule: Rule, *, length: Optional[int] = None) -> Rule:
    count = f'a list of {length} values' if length else 'a non-empty list of values'
    return Rule(f'{count}, each {rule.allowed}',
                lambda v: isinstance(v, (list, tuple)) and (len(v) == length if length else len(v) > 0)
                and all(rule.ok(x) for x in v))


def _auto_augment_ok(policy: str) -> bool:
    """timm's policy strings: 'rand-m9-mstd0.5-inc1', 'augmix-m5-w4', 'original', 'v0', ... ('none'
    or '' turn it off). timm skips sections it cannot parse, so each section is checked here first."""
    if policy in ('', 'none'):
        return True
    kind, *sections = policy.split('-')
    known = {'rand': r'(m|n|mstd|mmax|inc|p)\d+(\.\d+)?|t\w+', 'augmix': r'(m|w|d|a|b|mstd)\d+(\.\d+)?'}
    if kind in known and not all(re.fullmatch(known[kind], s) for s in sections):
        return False
    from timm.data.transforms_factory import create_transform
    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except (AssertionError, ValueError, KeyError, IndexError):
        return False
    return True


def _size(low: int, high: int, why: str) -> Rule:
    """An image side in pixels, bounded both ways: a side too small for the model's strides fails in a
    convolution, and a mistyped large one (100000) would allocate until the machine runs out of memory
    instead of failing."""
    return Rule(f'an integer from {low} to {high} ({why})', lambda v: _is_int(v) and low <= v <= high)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The multi-stage FocalNets reduce an image 32 times (a 4-pixel stem, three 2x downsamplings).
_IMAGE_SIDE = _size(32, 4096, '32: the total stride of the four stages; 4096: over ten times the largest '
                              'release resolution, 384 px, where one feature map of the first stage of '
                              'FocalNet-T alone takes 0.4 GB per image')
# Detection and segmentation resize whole images: the same floor, and twice the ceiling.
_DENSE_SIDE = _size(32, 8192, '32: the total stride of the backbone; 8192: four times the largest release '
                              'scale, 2048 px')

_NAME = Rule('a non-empty name without "/" (it names a folder)',
             lambda v: v not in ('', '.', '..') and '/' not in v and os.sep not in v)
_RATE = _within(0, 1, high_open=True)
_PROBABILITY = _within(0, 1)

RULES: Dict[str, Rule] = {
    'DATA.BATCH_SIZE': _at_least(1),
    'DATA.DATASET': _one_of('imagenet', 'folder', 'fake'),
    'DATA.IMG_SIZE': _IMAGE_SIDE,
    'DATA.INTERPOLATION': _one_of('bicubic', 'bilinear', 'nearest', 'lanczos', 'box', 'hamming', 'random'),
    'DATA.AUGMENT_ON': _one_of('auto', 'worker'),
    'DATA.CACHE_MODE': _one_of('no', 'part', 'full'),
    'DATA.NUM_WORKERS': _at_least(0),
    'DATA.FAKE_SIZE': _at_least(1),
    'MODEL.TYPE': _one_of('focalnet', 'focal'),
    'MODEL.NAME': _NAME,
    # 0 builds a backbone without a classifier (the demo's backbone-only weights).
    'MODEL.NUM_CLASSES': _at_least(0),
    'MODEL.DROP_RATE': _RATE,
    'MODEL.DROP_PATH_RATE': _RATE,
    'MODEL.LABEL_SMOOTHING': _RATE,
    'MODEL.FOCAL.PATCH_SIZE': _at_least(1),
    'MODEL.FOCAL.IN_CHANS': _at_least(1),
    'MODEL.FOCAL.EMBED_DIM': _at_least(1),
    'MODEL.FOCAL.DEPTHS': _each(_at_least(1)),
    'MODEL.FOCAL.MLP_RATIO': _above(0),
    'MODEL.FOCAL.FOCAL_LEVELS': _each(_at_least(0)),
    # The depth-wise kernels are FOCAL_FACTOR * l + FOCAL_WINDOW wide and padded by half: an even
    # kernel would change the map's size, so windows are odd and factors even.
    'MODEL.FOCAL.FOCAL_WINDOWS': _each(Rule('an odd integer >= 1', lambda v: v >= 1 and v % 2 == 1)),
    'MODEL.FOCAL.FOCAL_FACTORS': _each(Rule('an even integer >= 0', lambda v: v >= 0 and v % 2 == 0)),
    'MODEL.FOCAL.LAYERSCALE_VALUE': _above(0),
    'TRAIN.START_EPOCH': _at_least(0),
    'TRAIN.EPOCHS': _at_least(1),
    'TRAIN.WARMUP_EPOCHS': _at_least(0),
    'TRAIN.WEIGHT_DECAY': _at_least(0, 'a number'),
    'TRAIN.BASE_BATCH_SIZE': _at_least(1),
    'TRAIN.BASE_LR': _at_least(0, 'a number'),
    'TRAIN.WARMUP_LR': _at_least(0, 'a number'),
    'TRAIN.MIN_LR': _at_least(0, 'a number'),
    'TRAIN.CLIP_GRAD': _at_least(0, 'a number'),
    'TRAIN.ACCUMULATION_STEPS': _at_least(0),
    'TRAIN.LR_SCHEDULER.NAME': _one_of('cosine', 'linear', 'step'),
    'TRAIN.LR_SCHEDULER.DECAY_EPOCHS': _at_least(1),
    'TRAIN.LR_SCHEDULER.DECAY_RATE': _above(0),
    'TRAIN.OPTIMIZER.NAME': _one_of('adamw', 'sgd'),
    'TRAIN.OPTIMIZER.EPS': _above(0),
    'TRAIN.OPTIMIZER.BETAS': _each(_RATE, length=2),
    'TRAIN.OPTIMIZER.MOMENTUM': _RATE,
    'TRAIN.EMA.DECAY': _PROBABILITY,
    'AUG.COLOR_JITTER': _at_least(0, 'a number'),
    'AUG.AUTO_AUGMENT': Rule('a timm policy such as rand-m9-mstd0.5-inc1, augmix-m5-w3, original or v0, '
                             'or none', _auto_augment_ok),
    'AUG.HFLIP': _PROBABILITY,
    'AUG.REPROB': _PROBABILITY,
    'AUG.REMODE': _one_of('pixel', 'rand', 'const'),
    'AUG.RECOUNT': _at_least(1),
    'AUG.MIXUP': _at_least(0, 'a number'),
    'AUG.CUTMIX': _at_least(0, 'a number'),
    'AUG.CUTMIX_MINMAX': Rule('None or [min, max] with 0 < min < max <= 1',
                              lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2
                                                      and all(map(_number, v)) and 0 < v[0] < v[1] <= 1)),
    'AUG.MIXUP_PROB': _PROBABILITY,
    'AUG.MIXUP_SWITCH_PROB': _PROBABILITY,
    'AUG.MIXUP_MODE': _one_of('batch', 'pair', 'elem'),
    'AMP_OPT_LEVEL': _one_of('O0', 'O1', 'O2'),
    'OUTPUT': Rule('a non-empty path', lambda v: v != ''),
    'TAG': _NAME,
    'SAVE_FREQ': _at_least(1),
    'SAVE_KEEP': _at_least(0),
    'SAVE_MINUTES': _at_least(0, 'a number'),
    'DIST_TIMEOUT': _at_least(1),
    'PRINT_FREQ': _at_least(1),
    # numpy's global generator takes seeds below 2 ** 32.
    'DETECTION.MIN_SIZE_TRAIN': _each(_DENSE_SIDE),
    'DETECTION.MIN_SIZE_TEST': _DENSE_SIDE,
    'DETECTION.MAX_SIZE': _DENSE_SIDE,
    'DETECTION.CROP_RESIZE': Rule(f'an empty list (no crop) or a list of values, each {_DENSE_SIDE.allowed}',
                                  lambda v: isinstance(v, (list, tuple)) and all(map(_DENSE_SIDE.ok, v))),
    'DETECTION.CROP_SIZE': _each(_DENSE_SIDE, length=2),
    'SEG.AUG.SCALE': _each(_DENSE_SIDE, length=2),
    'SEG.AUG.CROP_SIZE': _DENSE_SIDE,
    'SEG.TEST.SCALE': _each(_DENSE_SIDE, length=2),
    'SEG.TEST.CROP_SIZE': _DENSE_SIDE,
    'SEG.TEST.STRIDE': _at_least(1),
    # The probabilities and rates of the dense tasks: NaN would pass every comparison silently
    # (a flip probability of NaN never flips).
    'DETECTION.HFLIP': _PROBABILITY,
    'DETECTION.SCORE_THRESH': _PROBABILITY,
    'DETECTION.WARMUP_ITERS': _at_least(0),
    'SEG.HEAD.DROPOUT': _RATE,
    'SEG.HEAD.AUX_WEIGHT': _at_least(0, 'a number'),
    'SEG.TRAIN.WARMUP_ITERS': _at_least(0),
    'SEG.TRAIN.POLY_POWER': _at_least(0, 'a number'),
    'SEG.AUG.RATIO_RANGE': _each(_above(0), length=2),
    'SEG.AUG.CAT_MAX_RATIO': Rule('a number in (0, 1]', lambda v: _number(v) and 0 < v <= 1),
    'SEG.AUG.FLIP': _PROBABILITY,
    'SEG.TEST.RATIOS': _each(_above(0)),
    'SEG.TEST.AUG_RATIOS': _each(_above(0)),
    'SEED': Rule(f'an integer from 0 to {2 ** 32 - 1}', lambda v: 0 <= v < 2 ** 32),
}


def _cross_checks(config: CN):
    """Rules that tie keys together."""
    focal = config.MODEL.FOCAL
    for key in ('FOCAL_LEVELS', 'FOCAL_WINDOWS', 'FOCAL_FACTORS'):
        if len(focal[key]) != len(focal.DEPTHS):
            raise UserError(f'MODEL.FOCAL.{key} has {len(focal[key])} entries but MODEL.FOCAL.DEPTHS '
                            f'{list(focal.DEPTHS)} has {len(focal.DEPTHS)} stages; give one per stage')
    if config.DATA.DATASET == 'fake' and config.MODEL.NUM_CLASSES < 1:
        raise UserError('MODEL.NUM_CLASSES must be at least 1 for --dataset fake (it labels the images); '
                        f'got {config.MODEL.NUM_CLASSES}')
    if config.TRAIN.START_EPOCH >= config.TRAIN.EPOCHS:
        raise UserError(f'TRAIN.START_EPOCH must be below TRAIN.EPOCHS ({config.TRAIN.EPOCHS}); '
                        f'got {config.TRAIN.START_EPOCH}')


def lookup(node: CN, key: str):
    for part in key.split('.'):
        if not isinstance(node, CN) or part not in node:
            return MISSING
        node = node[part]
    return node


MISSING = object()


def validate(config: CN):
    """Raise a UserError naming the first key whose value is not allowed, the value and what is.
    Keys the table does not know (sections added later) are left alone."""
    for key, rule in RULES.items():
        value = lookup(config, key)
        if value is not MISSING and not rule.ok(value):
            raise UserError(f'{key} must be {rule.allowed}; got {show(value)}')
    _cross_checks(config)


def show(value) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)
