"""timm's generic model tests (timm 1.0.31, tests/test_models.py), adapted, on all fifteen FocalNets.

Each test follows the logic of the timm test of the same name. timm's own FocalNet runs through the
same tests as a control (``CONTROL``): if timm's model passes, the adapted test asks what timm asks.

What was changed, and why:
- Size. timm runs its full models at up to 384 px. Here forward, backward, TorchScript, fx and
  feature tests build each release with its own options (focal levels and windows, stem, layer
  scale, post-norm, modulation norm, normaliser, patch size, classes) but narrow and shallow
  (``small_kwargs``: width 16, one block per stage; isotropic: width 32, 4 blocks), at 64-96 px, so
  that the fifteen models fit the CPU budget of the suite. The full-size models (up to 748M
  parameters) are built only on the meta device, where ``test_model_default_cfgs`` checks shapes
  at the release's own input size (224 or 384) without allocating memory.
- Agreement. Where timm checks only shapes and NaNs (TorchScript), the outputs must also equal
  eager to 1e-5.
- test_model_load_pretrained / test_model_features_pretrained download weights in timm; here the
  weights are written to a file in the test and loaded with ``checkpoint_path``, and the adapted
  1- and 4-channel stems are compared with timm's own ``adapt_input_conv``.
- test_model_forward_torchscript_with_features_fx uses timm's FeatureGraphNet (feature_cls='fx'),
  which takes the tensors at the ``feature_info`` modules as they are: (B, H, W, C) for FocalNet.
  In its place, torchvision's create_feature_extractor is pointed at the ``feature_info`` modules
  and must return exactly the features of forward_intermediates (then scripted).
- The fx tests trace with timm's leaf modules and functions and torchvision's
  create_feature_extractor, as timm's do; timm's extra step for models with several train-mode
  outputs is not needed (FocalNet has one).
- Left out: test_model_inference (timm's pretrained test_* models only), the *_non_std variants
  (FocalNet is a standard spatial model), and the NaFlex/Gemma tests (other architectures).
"""
import math

import pytest
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import FeatureInfo, adapt_input_conv, get_notrace_functions, get_notrace_modules
from timm.models.focalnet import _create_focalnet
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from models import create_model, list_models

RELEASES = list_models()
CONTROL = 'timm.focalnet_tiny_srf'  # timm's own FocalNet
NAMES = RELEASES + [CONTROL]

TARGET_FWD_SIZE = 96
TARGET_BWD_SIZE = 64
TARGET_JIT_SIZE = 64
TARGET_FFEAT_SIZE = 96
TARGET_FX_SIZE = 64
MAX_FWD_OUT_SIZE = 448


def small_kwargs(name: str) -> dict:
    if name.endswith('_iso'):
        return dict(embed_dim=32, depths=(4,))
    return dict(embed_dim=16, depths=(1, 1, 1, 1))


def build(name: str, full: bool = False, **kwargs):
    """The release ``name`` (or timm's control), shrunk unless ``full``."""
    if not full:
        kwargs = {**small_kwargs(name), **kwargs}
    if name == CONTROL:
        # timm's builder behind timm.create_model('focalnet_tiny_srf'), which fixes the sizes.
        return _create_focalnet('focalnet_tiny_srf', **{'depths': (2, 2, 6, 2), 'embed_dim': 96, **kwargs})
    return create_model(name, **kwargs)


def _get_input_size(model, target=None):
    """timm's rule: the pretrained config's size, each side capped at ``target``."""
    cfg = model.pretrained_cfg
    input_size = cfg['input_size']
    if cfg.get('fixed_input_size'):
        return input_size
    if target and max(input_size) > target:
        input_size = tuple(min(x, target) for x in input_size)
    return input_size


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name', NAMES)
def test_model_forward(name):
    model = build(name).eval()
    inputs = torch.randn(1, *_get_input_size(model, TARGET_FWD_SIZE))
    outputs = model(inputs)
    assert outputs.shape[0] == 1
    assert not torch.isnan(outputs).any()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(inputs), outputs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', NAMES)
def test_model_backward(name):
    model = build(name, num_classes=42).train()
    inputs = torch.randn(2, *_get_input_size(model, TARGET_BWD_SIZE))
    outputs = model(inputs)
    outputs.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f'no gradient for {n}'
    assert sum(p.grad.numel() for p in model.parameters()) == _params(model)
    assert outputs.shape[-1] == 42
    assert not torch.isnan(outputs).any()


def _reference_classes(reference, name):
    for line in (reference / 'official_state_dict_keys' / f'{name}.txt').read_text().splitlines():
        if line.startswith('head.weight\t'):
            return int(line.split('\t')[1].strip('[]').split(',')[0])
    return 0


@pytest.mark.parametrize('name', NAMES)
def test_model_default_cfgs(name, reference):
    """Full-size models on the meta device: shapes at the release's own input size."""
    with torch.device('meta'):
        model = build(name, full=True).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    assert cfg is model.pretrained_cfg
    pool_size, input_size = cfg['pool_size'], cfg['input_size']
    output_fmt = getattr(model, 'output_fmt', 'NCHW')
    spatial_axis, feat_axis = get_spatial_dim(output_fmt), get_channel_dim(output_fmt)
    assert all(x <= MAX_FWD_OUT_SIZE for x in input_size)
    x = torch.randn(1, *input_size, device='meta')

    outputs = model.forward_features(x)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    assert (outputs.shape[spatial_axis[0]], outputs.shape[spatial_axis[1]]) == tuple(pool_size)
    assert outputs.shape[feat_axis] == model.num_features
    assert outputs_pre.shape[1] == model.head_hidden_size

    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model(x)
    assert outputs.ndim == 2 and outputs.shape[1] == model.head_hidden_size
    assert outputs.shape == outputs_pre.shape

    model.reset_classifier(0, '')
    outputs = model(x)
    assert outputs.ndim == 4
    assert (outputs.shape[spatial_axis[0]], outputs.shape[spatial_axis[1]]) == tuple(pool_size)

    with torch.device('meta'):
        model = build(name, full=True, num_classes=0, global_pool='').eval()
    outputs = model(x)
    assert outputs.ndim == 4
    assert (outputs.shape[spatial_axis[0]], outputs.shape[spatial_axis[1]]) == tuple(pool_size)

    if cfg.get('num_classes'):
        assert cfg['classifier'] + '.weight' in state_dict
    assert cfg['first_conv'] + '.weight' in state_dict

    if name != CONTROL:
        # The release's own entries, against the official checkpoint layout.
        assert cfg['architecture'] == name
        assert cfg['num_classes'] == _reference_classes(reference, name)
        assert cfg['url'].endswith('/' + cfg['file']) and cfg['file'].endswith('.pth')
        assert input_size[1:] == ((384, 384) if '_384' in cfg['file'] else (224, 224))
        assert (cfg['crop_pct'], cfg['interpolation']) == (0.875, 'bicubic')


def _save_weights(model, path, layout='official'):
    state = model.state_dict()
    torch.save({'model': state} if layout == 'official' else state, path)
    return path


@pytest.mark.parametrize('name', NAMES)
def test_model_load_pretrained(name, tmp_path):
    """Weights load with in_chans != 3 (the stem adapted as timm adapts it) and with a new classifier."""
    source = build(name).eval()
    stem = 'stem.proj.weight' if name == CONTROL else 'patch_embed.proj.weight'
    rgb = source.state_dict()[stem]
    path = _save_weights(source, tmp_path / 'weights.pth', 'timm' if name == CONTROL else 'official')
    for in_chans, num_classes in ((1, 5), (4, 0)):
        if name == CONTROL:
            model = build(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          in_chans=in_chans, num_classes=num_classes)
        else:
            model = build(name, checkpoint_path=path, in_chans=in_chans, num_classes=num_classes)
        torch.testing.assert_close(model.state_dict()[stem], adapt_input_conv(in_chans, rgb))
        out = model.eval()(torch.randn(1, in_chans, 64, 64))
        assert out.shape == (1, num_classes or model.num_features)


@pytest.mark.parametrize('name', NAMES)
def test_model_features_pretrained(name, tmp_path):
    source = build(name).eval()
    path = _save_weights(source, tmp_path / 'weights.pth', 'timm' if name == CONTROL else 'official')
    if name == CONTROL:
        features = build(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                         features_only=True)
    else:
        features = build(name, checkpoint_path=path, features_only=True)
    features.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = features(x)
        want = source.forward_intermediates(x, indices=list(features.feature_info.out_indices),
                                            intermediates_only=True)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize('name', NAMES)
def test_model_forward_torchscript(name):
    model = build(name).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, *_get_input_size(model, TARGET_JIT_SIZE))
    with torch.no_grad():
        outputs, eager = scripted(x), model(x)
    assert outputs.shape[0] == 1 and not torch.isnan(outputs).any()
    torch.testing.assert_close(outputs, eager, rtol=1e-5, atol=1e-5)


def _check_features(model, outputs, input_size, batch_size=1):
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()
    output_fmt = getattr(model, 'output_fmt', 'NCHW')
    feat_axis, spatial_axis = get_channel_dim(output_fmt), get_spatial_dim(output_fmt)
    assert len(expected_channels) == len(outputs)
    for e, r, o in zip(expected_channels, expected_reduction, outputs):
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(input_size[-2] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(input_size[-1] / r) + 1
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()


@pytest.mark.parametrize('name', NAMES)
def test_model_forward_features(name):
    model = build(name, features_only=True).eval()
    assert len(model.feature_info.channels()) >= 3
    input_size = _get_input_size(model, TARGET_FFEAT_SIZE)
    _check_features(model, model(torch.randn(1, *input_size)), input_size)


@pytest.mark.parametrize('name', NAMES)
def test_model_forward_intermediates_features(name):
    model = build(name, features_only=True, feature_cls='getter').eval()
    input_size = _get_input_size(model, TARGET_FFEAT_SIZE)
    _check_features(model, model(torch.randn(1, *input_size)), input_size)


@pytest.mark.parametrize('name', NAMES)
def test_model_forward_intermediates(name):
    model = build(name).eval()
    feature_info = FeatureInfo(model.feature_info, len(model.feature_info))
    expected_channels, expected_reduction = feature_info.channels(), feature_info.reduction()
    assert len(expected_channels) >= 3
    input_size = _get_input_size(model, TARGET_FFEAT_SIZE)
    x = torch.randn(1, *input_size)
    output, intermediates = model.forward_intermediates(x, output_fmt='NCHW')
    assert len(expected_channels) == len(intermediates)
    for e, r, o in zip(expected_channels, expected_reduction, intermediates):
        assert e == o.shape[1]
        assert o.shape[2] <= math.ceil(input_size[-2] / r) + 1
        assert o.shape[3] <= math.ceil(input_size[-1] / r) + 1
        assert o.shape[0] == 1 and not torch.isnan(o).any()
    assert torch.allclose(output, model.forward_features(x))
    model.set_grad_checkpointing()
    output3, _ = model.forward_intermediates(x, output_fmt='NCHW')
    assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5)


def _fx_model(model):
    """The model as a torch.fx graph built by torchvision's create_feature_extractor, traced with
    timm's leaf modules and functions, returning the graph's last node (the logits) in train and in
    eval mode."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=train_nodes[-1:],
                                    eval_return_nodes=eval_nodes[-1:], tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize('name', NAMES)
def test_model_forward_fx(name):
    model = build(name).eval()
    with torch.inference_mode():
        inputs = torch.randn(1, *_get_input_size(model, TARGET_FX_SIZE))
        outputs = model(inputs)
        fx_outputs = torch.cat(tuple(_fx_model(model)(inputs).values()))
    assert torch.all(fx_outputs == outputs)
    assert outputs.shape[0] == 1 and not torch.isnan(outputs).any()


@pytest.mark.parametrize('name', NAMES)
def test_model_backward_fx(name):
    model = build(name, num_classes=42).train()
    num_params = _params(model)
    fx_model = _fx_model(model)
    outputs = torch.cat(tuple(fx_model(torch.randn(2, *_get_input_size(model, TARGET_FX_SIZE))).values()))
    outputs.mean().backward()
    for n, p in fx_model.named_parameters():
        assert p.grad is not None, f'no gradient for {n}'
    assert sum(p.grad.numel() for p in fx_model.parameters()) == num_params
    assert outputs.shape[-1] == 42 and not torch.isnan(outputs).any()


@pytest.mark.parametrize('name', NAMES)
def test_model_forward_fx_torchscript(name):
    model = build(name).eval()
    scripted = torch.jit.script(_fx_model(model))
    x = torch.randn(1, *_get_input_size(model, TARGET_JIT_SIZE))
    with torch.inference_mode():
        outputs = torch.cat(tuple(scripted(x).values()))
        eager = model(x)
    assert outputs.shape[0] == 1 and not torch.isnan(outputs).any()
    torch.testing.assert_close(outputs, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', RELEASES)
def test_feature_info_modules_with_fx_feature_extractor(name):
    """torchvision's create_feature_extractor at the feature_info modules gives the features of
    forward_intermediates (in the model's (B, H, W, C) output_fmt), also once scripted."""
    model = build(name).eval()
    nodes = {info['module']: str(i) for i, info in enumerate(model.feature_info)}
    extractor = create_feature_extractor(model, return_nodes=nodes)
    x = torch.randn(2, 3, 80, 48)
    with torch.no_grad():
        want = model.forward_intermediates(x, output_fmt=model.output_fmt, intermediates_only=True)
        for got in (extractor(x), torch.jit.script(extractor)(x)):
            assert list(got) == [str(i) for i in range(len(want))]
            for g, w in zip(got.values(), want):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
