"""The config: defaults (the paper's recipe), YAML files with BASE, --opts, flags, and clear errors."""
import argparse
from pathlib import Path

import pytest
import torch

import config as cfg
from errors import UserError
from models import create_model, list_models, model_kwargs_from_config
from models.focalnet import FocalNet

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
    c = cfg.load_config(None, ['DATA.BATCH_SIZE', '128', 'TRAIN.ACCUMULATION_STEPS', '2'])
    assert cfg.lr_scale(c, world_size=8) == 128 * 8 * 2 / 512
    c = cfg.load_config(None, ['DATA.BATCH_SIZE', '64', 'TRAIN.ACCUMULATION_STEPS', '0'])
    assert cfg.lr_scale(c, world_size=1) == 64 / 512


def test_with_num_classes_leaves_the_input_alone():
    c = cfg.load_config()
    d = cfg.with_num_classes(c, 10)
    assert (c.MODEL.NUM_CLASSES, d.MODEL.NUM_CLASSES) == (1000, 10) and d.is_frozen()
