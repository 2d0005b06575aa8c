"""The config: defaults (the paper's recipe), YAML files with BASE, --opts, flags, and clear errors."""
import argparse
from pathlib import Path

import pytest
import torch

import config as cfg
from errors import UserError
from models import create_model, list_models, model_kwargs_from_config
from models.focalnet import FocalNet

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize('name', list_models())
def test_released_config_describes_the_registered_architecture(name):
    config = cfg.load_config(str(CONFIGS / f'{name}.yaml'))
    assert config.MODEL.NAME == name
    kwargs = model_kwargs_from_config(config)
    kwargs.pop('use_checkpoint')
    with torch.device('meta'):  # shapes only: no memory for the large models' weights
        from_config = FocalNet(**kwargs)
        registered = create_model(name, num_classes=config.MODEL.NUM_CLASSES)
    assert _shapes(from_config) == _shapes(registered)
    for attr in ('use_postln',):
        assert from_config.layers[0].blocks[0].use_postln == registered.layers[0].blocks[0].use_postln, attr
    mod_c, mod_r = from_config.layers[-1].blocks[0].modulation, registered.layers[-1].blocks[0].modulation
    assert mod_c.normalize_modulator == mod_r.normalize_modulator
    assert mod_c.kernel_sizes == mod_r.kernel_sizes


@pytest.mark.parametrize('name, drop_path', [('focalnet_tiny_srf', 0.2), ('focalnet_small_lrf', 0.3),
                                             ('focalnet_base_srf', 0.5)])
def test_imagenet1k_recipe(name, drop_path):
    c = cfg.load_config(str(CONFIGS / f'{name}.yaml'))
    t = c.TRAIN
    assert (t.OPTIMIZER.NAME, t.BASE_LR, t.EPOCHS, t.WARMUP_EPOCHS, t.WEIGHT_DECAY, t.CLIP_GRAD) == \
        ('adamw', 5e-4, 300, 20, 0.05, 5.0)
    assert t.LR_SCHEDULER.NAME == 'cosine'
    assert c.MODEL.LABEL_SMOOTHING == 0.1 and c.MODEL.DROP_PATH_RATE == drop_path
    assert (c.AUG.AUTO_AUGMENT, c.AUG.MIXUP, c.AUG.CUTMIX, c.AUG.REPROB) == \
        ('rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.25)
    assert (c.DATA.IMG_SIZE, c.DATA.INTERPOLATION, c.TEST.CROP) == (224, 'bicubic', True)


@pytest.mark.parametrize('name, size', [('focalnet_large_fl3', 384), ('focalnet_xlarge_fl4', 384),
                                        ('focalnet_huge_fl3', 224)])
def test_22k_configs_carry_resolution_and_classes(name, size):
    c = cfg.load_config(str(CONFIGS / f'{name}.yaml'))
    assert (c.DATA.IMG_SIZE, c.MODEL.NUM_CLASSES) == (size, 21842)


def test_base_inheritance_then_file_then_opts(tmp_path):
    (tmp_path / 'base.yaml').write_text('TRAIN:\n  EPOCHS: 7\n  WARMUP_EPOCHS: 2\nDATA:\n  IMG_SIZE: 64\n')
    (tmp_path / 'child.yaml').write_text("BASE: ['base.yaml']\nTRAIN:\n  EPOCHS: 9\n")
    c = cfg.load_config(str(tmp_path / 'child.yaml'), ['DATA.IMG_SIZE', '96'])
    assert (c.TRAIN.EPOCHS, c.TRAIN.WARMUP_EPOCHS, c.DATA.IMG_SIZE) == (9, 2, 96)
    assert c.is_frozen()


def test_named_flags_override_opts(tmp_path):
    args = argparse.Namespace(cfg=None, opts=['DATA.BATCH_SIZE', '16', 'TAG', 'x'], batch_size=32,
                              data_path='/d', dataset='folder', zip=False, cache_mode=None, resume=None,
                              pretrained=None, accumulation_steps=None, use_checkpoint=True,
                              amp_opt_level='O0', output='/o', tag='7', eval=False, throughput=False)
    c = cfg.get_config(args)
    assert (c.DATA.BATCH_SIZE, c.DATA.DATA_PATH, c.DATA.DATASET, c.TAG) == (32, '/d', 'folder', '7')
    assert c.TRAIN.USE_CHECKPOINT and c.AMP_OPT_LEVEL == 'O0' and not c.DATA.ZIP_MODE
    assert cfg.output_dir(c) == '/o/focalnet_tiny_srf/7'


def test_official_yaml_is_accepted(tmp_path):
    # As the official repository writes them: TYPE is the model's name, PRETRAINED a flag.
    (tmp_path / 'official.yaml').write_text(
        'MODEL:\n  TYPE: focalnet_small_srf\n  NAME: focalnet_small_srf\n  PRETRAINED: True\n'
        '  DROP_PATH_RATE: 0.3\n  FOCAL:\n    EMBED_DIM: 96\n    DEPTHS: [2, 2, 18, 2]\n'
        '    FOCAL_LEVELS: [2, 2, 2, 2]\n    FOCAL_WINDOWS: [3, 3, 3, 3]\n')
    c = cfg.load_config(str(tmp_path / 'official.yaml'))
    assert c.MODEL.TYPE == 'focalnet' and c.MODEL.PRETRAINED == ''
    assert list(c.MODEL.FOCAL.DEPTHS) == [2, 2, 18, 2]


@pytest.mark.parametrize('text, opts, message', [
    ('MODEL:\n  FOCAL:\n    EMBED_DIMS: 96\n', (), 'MODEL.FOCAL.EMBED_DIMS'),
    ('', ('TRAIN.EPOCH', '3'), 'TRAIN.EPOCH'),
    ('', ('TRAIN.EPOCHS',), 'KEY VALUE'),
    ('', ('DATA.DATASET', 'cifar'), 'cifar'),
    ('', ('MODEL.FOCAL.DEPTHS', '[2, 2]'), 'FOCAL_LEVELS'),
    ('DATA: [1, 2]\n', (), 'DATA'),
])
def test_mistakes_name_the_bad_key_or_value(tmp_path, text, opts, message):
    path = tmp_path / 'c.yaml'
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace('[', r'\[').replace('.', r'\.')):
        cfg.load_config(str(path), opts)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UserError, match='nope.yaml'):
        cfg.load_config(str(tmp_path / 'nope.yaml'))


def test_lr_scale_is_global_batch_over_512():
    from lr_scheduler import lr_scale
    c = cfg.load_config(None, ['DATA.BATCH_SIZE', '128', 'TRAIN.ACCUMULATION_STEPS', '2'])
    assert lr_scale(c, world_size=8) == 128 * 8 * 2 / 512
    c = cfg.load_config(None, ['DATA.BATCH_SIZE', '64', 'TRAIN.ACCUMULATION_STEPS', '0'])
    assert lr_scale(c, world_size=1) == 64 / 512


# The rates of every release config before TRAIN.BASE_BATCH_SIZE replaced the three keys for one idea:
# 512 (classification), DETECTION.BASE_BATCH (16), SEG.TRAIN.LR_BATCH (16).
@pytest.mark.parametrize('folder, base_batch', [('', 512), ('detection', 16), ('segmentation', 16)])
def test_release_configs_keep_their_learning_rates(folder, base_batch):
    from lr_scheduler import lr_scale
    files = sorted((ROOT / 'configs' / folder).glob('*.yaml'))
    assert files
    for path in files:
        c = cfg.load_config(str(path))
        for world in (1, 8):
            assert lr_scale(c, world) == c.DATA.BATCH_SIZE * world * max(1, c.TRAIN.ACCUMULATION_STEPS) / base_batch


@pytest.mark.parametrize('old', ['DETECTION.BASE_BATCH', 'SEG.TRAIN.LR_BATCH'])
def test_the_old_base_batch_keys_still_set_the_one_key_with_a_warning(old, tmp_path, caplog):
    import logging
    with caplog.at_level(logging.WARNING, logger='focalnet'):
        c = cfg.load_config(None, [old, '32'])
    assert c.TRAIN.BASE_BATCH_SIZE == 32
    assert any(f'{old} in --opts is deprecated: it is now TRAIN.BASE_BATCH_SIZE' in r.getMessage()
               for r in caplog.records)
    section, *rest = old.split('.')
    nested = f'{rest[-1]}: 24'
    for part in reversed(rest[:-1]):
        nested = f'{part}:\n  {nested}'
    path = tmp_path / 'old.yaml'
    path.write_text(f'{section}:\n  ' + nested.replace('\n', '\n  ') + '\n')
    assert cfg.load_config(str(path)).TRAIN.BASE_BATCH_SIZE == 24
    assert 'BASE_BATCH:' not in c.dump().replace('BASE_BATCH_SIZE', '') and 'LR_BATCH' not in c.dump()


def test_with_num_classes_leaves_the_input_alone():
    c = cfg.load_config()
    d = cfg.with_num_classes(c, 10)
    assert (c.MODEL.NUM_CLASSES, d.MODEL.NUM_CLASSES) == (1000, 10) and d.is_frozen()


# ---------------------------------------------------------------------------------------------------
# Every value a user may set is checked before any work, in one line naming key, value and what is
# allowed.
# ---------------------------------------------------------------------------------------------------

# (key, value as typed after --opts, what the message must say is allowed)
BAD_VALUES = [
    ('DATA.BATCH_SIZE', '0', 'an integer >= 1'),
    ('DATA.BATCH_SIZE', '32.5', 'an integer >= 1'),
    ('DATA.BATCH_SIZE', 'True', 'an integer >= 1'),
    ('DATA.IMG_SIZE', '-224', 'an integer from 32 to 4096 (32: the total stride'),
    ('DATA.IMG_SIZE', 'None', 'an integer from 32 to 4096'),
    ('DATA.IMG_SIZE', '31', 'an integer from 32 to 4096'),
    ('DATA.IMG_SIZE', '100000', 'an integer from 32 to 4096'),
    ('SEG.AUG.CROP_SIZE', '16', 'an integer from 32 to 8192'),
    ('SEG.TEST.SCALE', '[100000, 512]', 'a list of 2 values, each an integer from 32 to 8192'),
    ('DETECTION.MAX_SIZE', '50000', 'an integer from 32 to 8192'),
    ('DETECTION.MIN_SIZE_TRAIN', '[800, 8]', 'each an integer from 32 to 8192'),
    ('DATA.NUM_WORKERS', '-1', 'an integer >= 0'),
    ('DATA.INTERPOLATION', 'cubic', 'one of bicubic, bilinear'),
    ('DATA.FAKE_SIZE', '0', 'an integer >= 1'),
    ('DATA.PIN_MEMORY', 'maybe', 'True or False'),
    ('MODEL.NAME', 'a/b', 'without "/"'),
    ('MODEL.NUM_CLASSES', '-1', 'an integer >= 0'),
    ('MODEL.DROP_PATH_RATE', '1.5', 'a number in [0, 1)'),
    ('MODEL.DROP_RATE', 'nan', 'a number in [0, 1)'),
    ('MODEL.LABEL_SMOOTHING', '-0.1', 'a number in [0, 1)'),
    ('MODEL.FOCAL.IN_CHANS', '0', 'an integer >= 1'),
    ('MODEL.FOCAL.EMBED_DIM', '0', 'an integer >= 1'),
    ('MODEL.FOCAL.PATCH_SIZE', '0', 'an integer >= 1'),
    ('MODEL.FOCAL.DEPTHS', '[]', 'a non-empty list'),
    ('MODEL.FOCAL.DEPTHS', '[2, "x", 6, 2]', 'each an integer >= 1'),
    ('MODEL.FOCAL.MLP_RATIO', '0', 'a number > 0'),
    ('MODEL.FOCAL.FOCAL_LEVELS', '[2, 2, -1, 2]', 'each an integer >= 0'),
    ('MODEL.FOCAL.FOCAL_WINDOWS', '[4, 4, 4, 4]', 'each an odd integer >= 1'),
    ('MODEL.FOCAL.FOCAL_FACTORS', '[1, 1, 1, 1]', 'each an even integer >= 0'),
    ('MODEL.FOCAL.LAYERSCALE_VALUE', '0', 'a number > 0'),
    ('TRAIN.EPOCHS', '0', 'an integer >= 1'),
    ('TRAIN.WARMUP_EPOCHS', '-5', 'an integer >= 0'),
    ('TRAIN.BASE_LR', 'abc', 'a number >= 0'),
    ('TRAIN.BASE_LR', '1e999', 'a number >= 0'),
    ('TRAIN.MIN_LR', '-1e-6', 'a number >= 0'),
    ('TRAIN.WEIGHT_DECAY', '-0.05', 'a number >= 0'),
    ('TRAIN.CLIP_GRAD', '-1', 'a number >= 0'),
    ('TRAIN.ACCUMULATION_STEPS', '-2', 'an integer >= 0'),
    ('TRAIN.LR_SCHEDULER.NAME', 'poly', 'one of cosine, linear, step'),
    ('TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '0', 'an integer >= 1'),
    ('TRAIN.LR_SCHEDULER.DECAY_RATE', '0', 'a number > 0'),
    ('TRAIN.OPTIMIZER.NAME', 'lamb', 'one of adamw, sgd'),
    ('TRAIN.OPTIMIZER.BETAS', '(0.9,)', 'a list of 2 values, each a number in [0, 1)'),
    ('TRAIN.OPTIMIZER.BETAS', '(0.9, 1.0)', 'a list of 2 values, each a number in [0, 1)'),
    ('TRAIN.OPTIMIZER.EPS', '0', 'a number > 0'),
    ('TRAIN.OPTIMIZER.MOMENTUM', '1.2', 'a number in [0, 1)'),
    ('TRAIN.EMA.DECAY', '1.5', 'a number in [0, 1]'),
    ('AUG.AUTO_AUGMENT', 'rand-m9-q3', 'a timm policy'),
    ('AUG.AUTO_AUGMENT', 'randaugment', 'a timm policy'),
    ('AUG.COLOR_JITTER', '-0.4', 'a number >= 0'),
    ('AUG.HFLIP', '2', 'a number in [0, 1]'),
    ('AUG.REPROB', '-0.25', 'a number in [0, 1]'),
    ('AUG.REMODE', 'noise', 'one of pixel, rand, const'),
    ('AUG.RECOUNT', '0', 'an integer >= 1'),
    ('AUG.MIXUP', '-0.8', 'a number >= 0'),
    ('AUG.CUTMIX_MINMAX', '[0.8, 0.2]', 'None or [min, max]'),
    ('AUG.MIXUP_PROB', '1.5', 'a number in [0, 1]'),
    ('AUG.MIXUP_MODE', 'row', 'one of batch, pair, elem'),
    ('AMP_OPT_LEVEL', 'O3', 'one of O0, O1, O2'),
    ('TAG', '..', 'a non-empty name'),
    ('SAVE_FREQ', '0', 'an integer >= 1'),
    ('SAVE_KEEP', '-1', 'an integer >= 0'),
    ('PRINT_FREQ', '0', 'an integer >= 1'),
    ('DIST_TIMEOUT', '0', 'an integer >= 1'),
    ('SEED', '-1', 'an integer from 0 to 4294967295'),
    ('SEED', str(2 ** 32), 'an integer from 0 to 4294967295'),
]


@pytest.mark.parametrize('key, value, allowed', BAD_VALUES, ids=[f'{k}={v}' for k, v, _ in BAD_VALUES])
def test_every_bad_value_is_named_with_what_is_allowed(key, value, allowed):
    with pytest.raises(UserError) as info:
        cfg.load_config(None, [key, value])
    message = str(info.value)
    assert message.startswith(f'{key} must be ') and allowed in message and '; got ' in message
    assert '\n' not in message


@pytest.mark.parametrize('key, value, expected', [
    ('TRAIN.BASE_LR', '1', 1.0),                       # an integer where a number is expected
    ('DATA.BATCH_SIZE', '64.0', 64),                   # a whole number where an integer is
    ('TRAIN.OPTIMIZER.BETAS', '[0.8, 0.99]', (0.8, 0.99)),
    ('DATA.PIN_MEMORY', 'false', False),
    ('TAG', '007', '007'),                             # text stays as typed
    ('AUG.AUTO_AUGMENT', 'augmix-m5-w4-d2', 'augmix-m5-w4-d2'),
    ('AUG.CUTMIX_MINMAX', '[0.2, 0.8]', [0.2, 0.8]),
    ('MODEL.FOCAL.FOCAL_LEVELS', '[0, 1, 2, 3]', [0, 1, 2, 3]),
])
def test_values_of_a_convertible_type_are_accepted(key, value, expected):
    c = cfg.load_config(None, [key, value])
    node = c
    for part in key.split('.'):
        node = node[part]
    assert node == expected and type(node) is type(expected)


def test_yaml_values_are_checked_and_converted_like_opts(tmp_path):
    (tmp_path / 'base.yaml').write_text('TRAIN:\n  EPOCHS: 7\n')
    (tmp_path / 'child.yaml').write_text('BASE: base.yaml\nTRAIN:\n  BASE_LR: 1\n')  # BASE as a string
    c = cfg.load_config(str(tmp_path / 'child.yaml'))
    assert (c.TRAIN.EPOCHS, c.TRAIN.BASE_LR) == (7, 1.0)
    (tmp_path / 'empty.yaml').write_text('TRAIN:\n  EPOCHS:\n')
    with pytest.raises(UserError, match=r'^TRAIN.EPOCHS must be an integer >= 1; got None$'):
        cfg.load_config(str(tmp_path / 'empty.yaml'))
    (tmp_path / 'section.yaml').write_text('TRAIN: 3\n')
    with pytest.raises(UserError, match='TRAIN in config file .* must be a mapping of keys; got 3'):
        cfg.load_config(str(tmp_path / 'section.yaml'))


@pytest.mark.parametrize('write, message', [
    (lambda p: p.write_bytes(bytes(range(256)) * 4), 'is not a YAML text file'),
    (lambda p: p.write_text('MODEL: [1, 2\n'), 'is not valid YAML: .* at line 2, column 1$'),
    (lambda p: p.write_text('just some text\n'), 'must hold a mapping of keys, not str'),
    (lambda p: p.mkdir(), 'is a folder; give a .yaml file'),
    (lambda p: p.write_text('BASE: 3\n'), 'BASE in config file .* must be a file name or a list of file names'),
    (lambda p: p.write_text('TRAIN:\n  EPOCHZ: 3\n'), r'unknown config key in config file .*: TRAIN.EPOCHZ '
                                                      r'\(did you mean TRAIN.EPOCHS\?\)'),
])
def test_unreadable_or_foreign_config_files_are_one_line_errors(tmp_path, write, message):
    path = tmp_path / 'c.yaml'
    write(path)
    with pytest.raises(UserError, match=message) as info:
        cfg.load_config(str(path))
    assert str(path) in str(info.value) and '\n' not in str(info.value)


def test_cross_key_rules():
    with pytest.raises(UserError, match='TRAIN.START_EPOCH must be below TRAIN.EPOCHS'):
        cfg.load_config(None, ['TRAIN.EPOCHS', '10', 'TRAIN.START_EPOCH', '10'])
    with pytest.raises(UserError, match='MODEL.NUM_CLASSES must be at least 1 for --dataset fake'):
        cfg.load_config(None, ['DATA.DATASET', 'fake', 'MODEL.NUM_CLASSES', '0'])
    assert cfg.load_config(None, ['MODEL.NUM_CLASSES', '0']).MODEL.NUM_CLASSES == 0  # a backbone
    with pytest.raises(UserError, match='names a section, not a key; .* such as TRAIN.START_EPOCH'):
        cfg.load_config(None, ['TRAIN', '3'])


def test_sections_without_rules_are_type_checked_only():
    from yacs.config import CfgNode as CN
    original = cfg._C
    try:
        extended = original.clone()
        extended.EXTRA = CN()
        extended.EXTRA.SCORE_THRESH = 0.05
        cfg._C = extended
        c = cfg.load_config(None, ['EXTRA.SCORE_THRESH', '1'])
        assert c.EXTRA.SCORE_THRESH == 1.0
        with pytest.raises(UserError, match=r"EXTRA.SCORE_THRESH must be a number; got 'x'"):
            cfg.load_config(None, ['EXTRA.SCORE_THRESH', 'x'])
    finally:
        cfg._C = original


def test_a_bad_value_stops_main_before_any_work(tmp_path, capsys):
    import main
    code = main.main(['--dataset', 'fake', '--output', str(tmp_path / 'out'), '--opts', 'SAVE_FREQ', '0'])
    err = capsys.readouterr().err
    assert code == 2
    assert err == 'error: SAVE_FREQ must be an integer >= 1; got 0\n'
    assert not (tmp_path / 'out').exists()  # nothing was written, nothing trained
