"""The model package against the official implementation's reference data."""
import csv
import json

import pytest
import torch

from conftest import ROOT

from models import FocalNet, FocalNetBlock, build_model, create_model, list_models
from models.cost import count_flops, count_params

RELEASES = [
    'focalnet_tiny_srf', 'focalnet_tiny_lrf', 'focalnet_small_srf', 'focalnet_small_lrf',
    'focalnet_base_srf', 'focalnet_base_lrf', 'focalnet_tiny_iso', 'focalnet_small_iso',
    'focalnet_base_iso', 'focalnet_large_fl3', 'focalnet_large_fl4', 'focalnet_xlarge_fl3',
    'focalnet_xlarge_fl4', 'focalnet_huge_fl3', 'focalnet_huge_fl4',
]
CASES = ['srf', 'lrf', 'mixed_levels', 'normalize_modulator', 'large_style', 'large_fl4_style',
         'huge_style', 'iso', 'iso_base_style', 'non_square_96x64',
         'classification_tiny_srf_100x76']  # not a multiple of 32: the convolutions floor


def case_model(config: dict) -> FocalNet:
    return FocalNet(
        img_size=config['IMG_SIZE'], patch_size=config['PATCH_SIZE'],
        num_classes=config['NUM_CLASSES'], embed_dim=config['EMBED_DIM'], depths=config['DEPTHS'],
        mlp_ratio=config['MLP_RATIO'], focal_levels=config['FOCAL_LEVELS'],
        focal_windows=config['FOCAL_WINDOWS'], use_conv_embed=config['USE_CONV_EMBED'],
        use_layerscale=config['USE_LAYERSCALE'], use_postln=config['USE_POSTLN'],
        use_postln_in_modulation=config['USE_POSTLN_IN_MODULATION'],
        normalize_modulator=config['NORMALIZE_MODULATOR'], drop_path_rate=0.)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny(name, **kw):
    """A released architecture shrunk for CPU tests: same options, fewer and narrower blocks."""
    depths = (1,) if name.endswith('_iso') else (1, 1, 2, 1)
    return create_model(name, embed_dim=16, depths=depths, num_classes=5, **kw)


def test_registry_lists_the_fifteen_releases():
    assert sorted(RELEASES) == list_models()


def test_unknown_name_is_named():
    with pytest.raises(ValueError, match='focalnet_tiny_xyz'):
        create_model('focalnet_tiny_xyz')


@pytest.mark.parametrize('name', RELEASES)
def test_release_key_layout(name, reference):
    with torch.device('meta'):
        model = create_model(name)
    expected = []
    for line in (reference / 'official_state_dict_keys' / f'{name}.txt').read_text().splitlines():
        key, shape = line.split('\t')
        expected.append((key, json.loads(shape)))
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected
    summary = json.loads((reference / 'official_state_dict_keys' / 'summary.json').read_text())
    assert count_params(model) == summary[name]['num_params']


@pytest.mark.parametrize('case', CASES)
def test_reference_case(case, reference):
    data = torch.load(reference / 'cases' / f'{case}.pt', weights_only=True)
    model = case_model(data['config']).eval()
    model.load_state_dict(data['state_dict'], strict=True)
    with torch.no_grad():
        logits, maps = model.modulation_maps(data['input'])
        pooled = model.forward_head(model.forward_features(data['input']), pre_logits=True)
        plain = model(data['input'])
    (last,) = maps.values()
    # docs/classification.md's promise: a relative error below 1e-6 for every reference case.
    assert rel_err(logits, data['logits']) < 1e-6
    assert rel_err(plain, data['logits']) < 1e-6
    assert rel_err(pooled, data['pooled_features']) < 1e-6
    assert rel_err(last['gates'], data['last_block_gates']) < 1e-6
    assert rel_err(last['modulator'], data['last_block_modulator']) < 1e-6


@pytest.mark.parametrize('name', RELEASES)
def test_forward_backward_every_parameter(name):
    model = tiny(name, drop_path_rate=0.1)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize('name', ['focalnet_tiny_srf', 'focalnet_huge_fl4', 'focalnet_base_iso'])
def test_gradient_checkpointing_changes_nothing(name):
    model = tiny(name).train()
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)  # same drop-path masks in both passes
        out = model(x)
        out.sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], msg=n)


def _block_calls(model, x, monkeypatch) -> int:
    """How many times the blocks run in one forward and backward pass (a recomputation calls
    forward again, without module hooks)."""
    calls = []
    forward = FocalNetBlock.forward
    monkeypatch.setattr(FocalNetBlock, 'forward', lambda self, *a: calls.append(1) or forward(self, *a))
    model(x).sum().backward()
    monkeypatch.setattr(FocalNetBlock, 'forward', forward)
    return len(calls)


@pytest.mark.parametrize('name', ['focalnet_tiny_srf', 'focalnet_base_iso'])
def test_gradient_checkpointing_really_recomputes_the_blocks(name, monkeypatch):
    """Equal results alone would also pass if checkpointing did nothing: with it on, every block runs
    a second time in the backward pass (its activations were not kept), and only while training."""
    model = tiny(name).train()
    blocks = sum(isinstance(m, FocalNetBlock) for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    model.set_grad_checkpointing(False)
    assert _block_calls(model, x, monkeypatch) == blocks
    model.set_grad_checkpointing(True)
    assert _block_calls(model, x, monkeypatch) == 2 * blocks
    # What --use-checkpoint (TRAIN.USE_CHECKPOINT) builds is on as well.
    from config import load_config
    config = load_config(None, ['MODEL.FOCAL.EMBED_DIM', '16', 'MODEL.FOCAL.DEPTHS', '[1, 1, 2, 1]',
                                'TRAIN.USE_CHECKPOINT', 'True', 'MODEL.NUM_CLASSES', '5'])
    built = build_model(config).train()
    assert _block_calls(built, x, monkeypatch) == 2 * 5


def test_non_square_inputs_floor():
    """As in the official classification model, the patch convolutions drop what does not fill a patch."""
    model = tiny('focalnet_tiny_srf').eval()
    for h, w in [(96, 64), (70, 90)]:
        feats = model.forward_intermediates(torch.randn(1, 3, h, w), intermediates_only=True)
        assert [f.shape[1] for f in feats] == [16, 32, 64, 128]
        assert [tuple(f.shape[-2:]) for f in feats] == [(h // 4 >> i, w // 4 >> i) for i in range(4)]


def test_odd_size_is_its_floored_crop(reference):
    """The official classification model at 99x75 computes exactly what it computes on the 96x72
    top-left crop (reference README): the rows and columns beyond are never seen."""
    data = torch.load(reference / 'cases' / 'classification_tiny_srf_100x76.pt', weights_only=True)
    model = case_model(data['config']).eval()
    model.load_state_dict(data['state_dict'])
    x = torch.randn(2, 3, 99, 75)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x[:, :, :96, :72]), rtol=0, atol=0)
        # 100x76 (the reference input) also equals its 96x72 crop: 25x19 tokens floor to 12x9.
        torch.testing.assert_close(model(data['input']), model(data['input'][:, :, :96, :72]))


@pytest.mark.parametrize('large', [False, True], ids=['patch_stem', 'conv_stem'])
@pytest.mark.parametrize('size', [(100, 100), (200, 200), (230, 230), (230, 197)])
def test_odd_sizes_match_timm(large, size):
    """timm's FocalNet, whose convolutions also floor, computes the same logits at sizes that are not
    multiples of 32 (the sizes at which padding made the results differ by 20-50%)."""
    from timm.models.focalnet import FocalNet as TimmFocalNet
    from models.pretrained import to_timm
    kw = dict(embed_dim=16, depths=(1, 1, 2, 1), focal_levels=(2, 2, 3, 3), focal_windows=(3, 3, 3, 5))
    ours = FocalNet(**kw, num_classes=10, drop_path_rate=0., use_conv_embed=large, use_layerscale=large,
                    use_postln=large).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theirs = TimmFocalNet(**kw, num_classes=10, drop_path_rate=0., use_overlap_down=large,
                          use_post_norm=large, layerscale_value=1e-4 if large else None).eval()
    theirs.load_state_dict(to_timm(ours.state_dict(), use_postln=large), strict=True)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) < 1e-5


def test_intermediates_match_forward():
    model = tiny('focalnet_small_lrf').eval()
    x = torch.randn(2, 3, 64, 64)
    final, feats = model.forward_intermediates(x)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    torch.testing.assert_close(final, model.forward_features(x))
    pooled = model.norm(feats[-1].permute(0, 2, 3, 1)).mean((1, 2))
    torch.testing.assert_close(model.head(pooled), model(x))


def test_modulation_maps_any_block_and_nothing_kept():
    model = tiny('focalnet_tiny_lrf').eval()
    x = torch.randn(2, 3, 64, 64)
    logits, maps = model.modulation_maps(x, blocks=[(0, 0), (2, -1)])
    assert set(maps) == {(0, 0), (2, 1)}
    assert maps[(0, 0)]['gates'].shape == (2, 4, 16, 16)
    assert maps[(2, 1)]['modulator'].shape == (2, 64, 4, 4)
    torch.testing.assert_close(logits, model(x))
    for module in model.modules():
        assert not any(isinstance(v, torch.Tensor) for k, v in vars(module).items()
                       if k not in ('_parameters', '_buffers'))
    with pytest.raises(IndexError, match='stage 4'):
        model.modulation_maps(x, blocks=[(4, 0)])


def test_no_weight_decay_and_reset_classifier():
    model = tiny('focalnet_large_fl3')
    nwd = model.no_weight_decay()
    assert nwd and all(n.endswith(('gamma_1', 'gamma_2')) for n in nwd)
    assert tiny('focalnet_tiny_srf').no_weight_decay() == set()
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128)


def test_overrides_reach_the_model():
    model = create_model('focalnet_tiny_srf', embed_dim=32, depths=(1, 1, 1, 1), focal_levels=(1, 2, 3, 4),
                         focal_windows=(7, 5, 3, 1), use_layerscale=True, num_classes=3)
    assert model.num_features == 256
    assert [s.blocks[0].modulation.kernel_sizes for s in model.layers] == [[7], [5, 7], [3, 5, 7], [1, 3, 5, 7]]
    assert model.layers[0].blocks[0].gamma_1 is not None
    with pytest.raises(ValueError, match='focal_levels'):
        create_model('focalnet_tiny_srf', focal_levels=(2, 2))


def test_table_cost_columns(reference):
    """Parameters and FLOPs of the nine ImageNet-1K models as the paper prints them (one decimal)."""
    for row in csv.DictReader((reference / 'imagenet1k_table.csv').open()):
        with torch.device('meta'):
            model = create_model(row['config'])
        params = count_params(model)
        if row['config'] == 'focalnet_base_iso':
            # The paper counted the official builder's model, which lacks the modulation layer norms
            # that the released weights carry (12 blocks x 2 x 768).
            params -= 12 * 2 * 768
        assert round(params / 1e6, 1) == float(row['params_m']), row['config']
        assert round(count_flops(model) / 1e9, 1) == float(row['gflops']), row['config']


@pytest.mark.parametrize('name', RELEASES)
def test_release_config_builds_the_release(name):
    """configs/<name>.yaml alone determines the network: the same architecture as create_model(name)."""
    from config import load_config
    config = load_config(str(ROOT / 'configs' / f'{name}.yaml'))
    with torch.device('meta'):
        from_config, from_registry = build_model(config), create_model(name)
    assert config.MODEL.NAME == name
    assert [(k, v.shape) for k, v in from_config.state_dict().items()] == \
        [(k, v.shape) for k, v in from_registry.state_dict().items()]
    for a, b in zip(from_config.modules(), from_registry.modules()):
        assert type(a) is type(b)
        if isinstance(a, FocalNetBlock):
            assert (a.use_postln, a.modulation.normalize_modulator, a.modulation.kernel_sizes) == \
                (b.use_postln, b.modulation.normalize_modulator, b.modulation.kernel_sizes)


def test_config_overrides_reach_the_model():
    from config import load_config
    config = load_config(str(ROOT / 'configs' / 'focalnet_tiny_srf.yaml'), opts=[
        'MODEL.FOCAL.EMBED_DIM', '32', 'MODEL.FOCAL.DEPTHS', '[1, 1, 1, 1]',
        'MODEL.FOCAL.FOCAL_LEVELS', '[1, 2, 3, 4]', 'MODEL.FOCAL.USE_LAYERSCALE', 'True',
        'MODEL.FOCAL.NORMALIZE_MODULATOR', 'True', 'MODEL.NUM_CLASSES', '7'])
    model = build_model(config)
    assert model.num_features == 256 and model.head.out_features == 7
    assert [s.blocks[0].modulation.focal_level for s in model.layers] == [1, 2, 3, 4]
    assert model.layers[0].blocks[0].gamma_1 is not None
    assert model.layers[0].blocks[0].modulation.normalize_modulator


# ---- timm interface details (timm's generic tests: tests/test_timm_interface.py) -------------------

def test_pretrained_is_refused_naming_the_release_file():
    with pytest.raises(ValueError, match=r'never downloaded.*focalnet_large_lrf_384_fl4\.pth'):
        create_model('focalnet_large_fl4', pretrained=True)
    cfg = create_model('focalnet_base_iso', embed_dim=16, depths=(1,)).pretrained_cfg
    assert cfg['file'] == 'focalnet_base_iso_16.pth' and cfg['num_classes'] == 1000


def test_forward_intermediates_options():
    model = tiny('focalnet_small_lrf').eval()
    x = torch.randn(2, 3, 64, 64)
    final, every = model.forward_intermediates(x)
    last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    assert [t.shape for t in last_two] == [t.shape for t in every[2:]]
    torch.testing.assert_close(picked[1], every[3])
    nhwc = model.forward_intermediates(x, output_fmt='NHWC', intermediates_only=True)
    torch.testing.assert_close(nhwc[1], every[1].permute(0, 2, 3, 1))
    normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
    torch.testing.assert_close(normed[0], every[0])  # the final norm fits only the last stage
    torch.testing.assert_close(normed[3].permute(0, 2, 3, 1), final)
    early, feats = model.forward_intermediates(x, indices=[1], stop_early=True)
    torch.testing.assert_close(early, feats[0].permute(0, 2, 3, 1))  # stopped after stage 1
    for bad, match in [(dict(indices=5), 'last 5'), (dict(indices=[4]), 'feature index 4'),
                       (dict(output_fmt='NLC'), 'output_fmt')]:
        with pytest.raises(ValueError, match=match):
            model.forward_intermediates(x, **bad)


def test_prune_and_features_only():
    features = create_model('focalnet_tiny_srf', embed_dim=16, depths=(1, 1, 2, 1), features_only=True,
                            out_indices=(0, 2)).eval()
    assert features.feature_info.channels() == [16, 64] and features.feature_info.reduction() == [4, 16]
    pruned = features.model  # the stage after the last feature, and what follows, are gone
    assert len(pruned.layers) == 3 and pruned.layers[-1].downsample is None
    assert isinstance(pruned.norm, torch.nn.Identity) and isinstance(pruned.head, torch.nn.Identity)
    assert 'num_classes' not in features.pretrained_cfg
    full = create_model('focalnet_tiny_srf', embed_dim=16, depths=(1, 1, 2, 1)).eval()
    full.load_state_dict(pruned.state_dict(), strict=False)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        want = full.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        for got, w in zip(features(x), want):
            torch.testing.assert_close(got, w)
    iso = create_model('focalnet_small_iso', embed_dim=16, features_only=True)
    assert iso.feature_info.out_indices == (2, 5, 8, 11)  # the ends of the four quarters
    with pytest.raises(ValueError, match='feature_cls'):
        create_model('focalnet_tiny_srf', embed_dim=16, features_only=True, feature_cls='hook')


def test_global_pool_and_classifier_reset():
    model = tiny('focalnet_tiny_srf', global_pool='').eval()
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == (1, 2, 2, 5)  # per-position logits, no pooling
    model.reset_classifier(3, 'avg')
    assert model(x).shape == (1, 3) and model.num_classes == 3
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(3, 'max')


def test_build_model_describes_the_config_transform():
    from config import load_config
    config = load_config(str(ROOT / 'configs' / 'focalnet_tiny_srf.yaml'), opts=[
        'DATA.IMG_SIZE', '288', 'TEST.CROP', 'False', 'MODEL.NUM_CLASSES', '10'])
    with torch.device('meta'):
        cfg = build_model(config).pretrained_cfg
    assert (cfg['input_size'], cfg['pool_size'], cfg['crop_pct']) == ((3, 288, 288), (9, 9), 1.0)
    assert cfg['architecture'] == 'focalnet_tiny_srf' and cfg['num_classes'] == 10
