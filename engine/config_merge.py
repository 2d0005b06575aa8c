"""Reading and merging config values: YAML files (with their BASE files), --opts KEY VALUE pairs and
typed overrides, each value brought to its default's type; and the differences between two configs."""
import difflib
import logging
import math
import os
from ast import literal_eval
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import yaml
from yacs.config import CfgNode as CN

from errors import UserError

from .config_checks import MISSING, RULES, lookup, show

logger = logging.getLogger('focalnet')

# Keys that were renamed: the old name is still read (into the new key, with a warning) so that
# existing config files and command lines keep working; it is no longer written.
RENAMED = {
    # One key for the global batch the learning rates are meant for, in every task.
    'DETECTION.BASE_BATCH': 'TRAIN.BASE_BATCH_SIZE',
    'SEG.TRAIN.LR_BATCH': 'TRAIN.BASE_BATCH_SIZE',
}


def _deprecated(old: str, where: str):
    logger.warning(f'{old} in {where} is deprecated: it is now {RENAMED[old]} (same meaning); '
                   f'rename it, the old name will be refused in a later release')


def _renamed(data: dict, where: str) -> dict:
    """``data`` (a nested mapping) with each old key of RENAMED moved to its new place; a new key given
    as well wins."""
    for old, new in RENAMED.items():
        *parents, leaf = old.split('.')
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        _deprecated(old, where)
        *parents, leaf = new.split('.')
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        else:
            node.setdefault(leaf, value)
    return data

_ARCH_NAMES = None  # the registered model names, read on first use


def _registered_names():
    global _ARCH_NAMES
    if _ARCH_NAMES is None:
        from models import list_models
        _ARCH_NAMES = set(list_models())
    return _ARCH_NAMES

_TYPE_NAMES = {bool: 'True or False', int: 'an integer', float: 'a number', str: 'a string'}


def _coerce(key: str, value, default):
    """``value`` in the type of ``default`` (which decides what a key holds), or a UserError naming
    the key. Integers are accepted for numbers, whole numbers for integers, numbers for strings,
    'true' / 'false' for booleans, lists for tuples and the other way round."""
    def fail(expected: str):
        rule = RULES.get(key)
        raise UserError(f'{key} must be {rule.allowed if rule else expected}; got {show(value)}')

    kind = type(default)
    if isinstance(value, str) and kind is not str:
        value = _parse_value(value)  # as yacs reads YAML: 'BETAS: (0.9, 0.999)' is a tuple
    if default is None:  # optional values (AUG.CUTMIX_MINMAX): the rule decides
        return value
    if kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail(f'a list, such as {list(default)}')
        if not default:
            return kind(value)
        try:
            return kind(_coerce(key, x, default[0]) for x in value)
        except UserError:  # name the whole list, not the element
            fail(f'a list of {_TYPE_NAMES.get(type(default[0]), "values")}')
    if kind is bool:
        if isinstance(value, str) and value.lower() in ('true', 'false'):
            return value.lower() == 'true'
        if not isinstance(value, bool):
            fail('True or False')
        return value
    if kind is int:
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            fail('an integer')
        return value
    if kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            fail('a number')
        return float(value)
    if kind is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            fail('a string')
        return value
    return value


def _read_yaml(path: str) -> dict:
    if os.path.isdir(path):
        raise UserError(f'config file {path} is a folder; give a .yaml file')
    if not os.path.exists(path):
        raise UserError(f'config file not found: {path}')
    if not os.path.isfile(path):  # opening a FIFO would wait for a writer for ever
        raise UserError(f'config file {path} is not a regular file (a FIFO, socket or device)')
    try:
        with open(path, encoding='utf-8') as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise UserError(f'config file {path} is not a YAML text file (it is not UTF-8 text)') from None
    except OSError as e:
        raise UserError(f'cannot read the config file {path}: {e.strerror or e}') from None
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark else ''
        raise UserError(f'config file {path} is not valid YAML: {getattr(e, "problem", None) or e}'
                        f'{where}') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f'config file {path} must hold a mapping of keys, not {type(data).__name__}')
    return data


def _normalise_official(data: dict) -> dict:
    """Accept what the official YAML files write: MODEL.TYPE set to the model's name, and
    ``MODEL.PRETRAINED: True`` (a note that the weights came from pre-training, not a path)."""
    model = data.get('MODEL')
    if isinstance(model, dict):
        if isinstance(model.get('PRETRAINED'), bool):
            model.pop('PRETRAINED')
        if isinstance(model.get('TYPE'), str) and model['TYPE'] in _registered_names():
            model['TYPE'] = 'focalnet'
    return data


def _bases(data: dict, path: str) -> List[str]:
    """The BASE entry: one file name or a list of them."""
    bases = data.pop('BASE', None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, (list, tuple)) or not all(isinstance(b, str) for b in bases):
        raise UserError(f'BASE in config file {path} must be a file name or a list of file names; '
                        f'got {show(bases)}')
    return [b for b in bases if b]


def merge_file(config: CN, path: str, defaults: CN, seen: tuple = ()):
    if os.path.abspath(path) in seen:
        raise UserError(f'config file {path} includes itself through BASE')
    data = _read_yaml(path)
    for base in _bases(data, path):
        merge_file(config, os.path.join(os.path.dirname(path), base), defaults,
                   seen + (os.path.abspath(path),))
    where = f'config file {path}'
    _merge(config, _renamed(_normalise_official(data), where), where, defaults)


# Keys of a stored config that say where and how that run ran, not what it trained: a run that starts
# from the stored config (an evaluation) keeps its own.
RUN_KEYS = ('OUTPUT', 'TAG', 'MODEL.RESUME', 'MODEL.PRETRAINED', 'EVAL_MODE', 'THROUGHPUT_MODE',
            'TRAIN.AUTO_RESUME')


def merge_stored(config: CN, text: str, where: str, defaults: CN):
    """Merge a config saved as YAML text (a checkpoint's), but for its RUN_KEYS. Keys this version
    does not know (from an older or newer version) are left out with a warning instead of stopping
    the run."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f'{where} is not valid YAML: {getattr(e, "problem", None) or e}') from None
    if not isinstance(data, dict):
        raise UserError(f'{where} is not a mapping of keys')
    data = _renamed(data, where)
    data.pop('BASE', None)
    known = set(_all_keys(defaults))
    dropped = []

    def keep_known(node: dict, prefix: str = '') -> dict:
        kept = {}
        for key, value in node.items():
            full = f'{prefix}{key}'
            if full in RUN_KEYS:
                continue
            if isinstance(value, dict) and isinstance(lookup(defaults, full), CN):
                kept[key] = keep_known(value, full + '.')
            elif full in known:
                kept[key] = value
            else:
                dropped.append(full)
        return kept

    data = keep_known(data)
    if dropped:
        logger.warning(f'{where}: left out {len(dropped)} key(s) this version does not know: '
                       f'{", ".join(dropped[:5])}{" ..." if len(dropped) > 5 else ""}')
    _merge(config, data, where, defaults)


def _unknown(key: str, where: str, known: Iterable[str]) -> UserError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f' (did you mean {close[0]}?)' if close else ''
    return UserError(f'unknown config key in {where}: {key}{hint}')


def _all_keys(node: CN, prefix: str = '') -> List[str]:
    keys = []
    for k, v in node.items():
        keys += _all_keys(v, f'{prefix}{k}.') if isinstance(v, CN) else [prefix + k]
    return keys


def _merge(config: CN, data: dict, where: str, defaults: CN, prefix: str = ''):
    """Merge a nested mapping into ``config``, each value brought to its default's type."""
    for key, value in data.items():
        full = f'{prefix}{key}'
        if not isinstance(key, str) or key not in config:
            if isinstance(key, str) and config.is_new_allowed():
                config[key] = CN(value) if isinstance(value, dict) else value
                continue
            raise _unknown(full, where, _all_keys(defaults))
        if isinstance(config[key], CN):
            if not isinstance(value, dict):
                raise UserError(f'{full} in {where} must be a mapping of keys; got {show(value)}')
            _merge(config[key], value, where, defaults, full + '.')
        else:
            default = lookup(defaults, full)
            config[key] = _coerce(full, value, config[key] if default is MISSING else default)


def _parse_value(text: str):
    """A command-line value as Python reads it (numbers, lists, True/False, None), else the text."""
    try:
        return literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def merge_opts(config: CN, opts: Sequence[str], defaults: CN):
    opts = list(opts)
    if len(opts) % 2:
        raise UserError(f'--opts takes KEY VALUE pairs; got an odd number of items: {" ".join(opts)}')
    for key, value in zip(opts[0::2], opts[1::2]):
        if key in RENAMED:
            _deprecated(key, '--opts')
            key = RENAMED[key]
        if isinstance(lookup(config, key), CN):
            raise UserError(f'--opts {key} names a section, not a key; give one of its keys, such as '
                            f'{key}.{next(iter(lookup(config, key)))}')
        if lookup(config, key) is MISSING:
            raise _unknown(key, '--opts', _all_keys(defaults))
        if key == 'MODEL.TYPE' and value in _registered_names():
            value = 'focalnet'
        *parents, leaf = key.split('.')
        # Text keys take the text as typed (a TAG of 007 stays '007').
        tree = {leaf: value if isinstance(lookup(config, key), str) else _parse_value(value)}
        for p in reversed(parents):
            tree = {p: tree}
        _merge(config, tree, '--opts', defaults)


def set_key(config: CN, key: str, value):
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = _coerce(key, value, node[leaf])


def _flatten(node, prefix: str = '') -> Dict[str, Any]:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def config_differences(before: str, after: CN) -> List[Tuple[str, Any, Any]]:
    """(key, value in ``before``, value in ``after``) for every key whose value differs; ``before`` is
    a config as YAML text (what checkpoints store). Keys only one side has are listed with None on
    the other."""
    try:
        old = _flatten(yaml.safe_load(before) or {})
    except yaml.YAMLError:
        return []
    new = _flatten(after)
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
