"""The released FocalNet architectures by name, and the builders that read them or a config."""
from os import PathLike
from typing import Callable, Dict, List, Sequence, Union

import torch.nn as nn

from .focalnet import FocalNet, default_out_indices

_REGISTRY: Dict[str, Callable[..., FocalNet]] = {}

# The official releases (github.com/microsoft/FocalNet): weight file, where it was published, the
# training data and the resolution it was trained (and is evaluated) at. Nothing here is downloaded;
# the names tell users which file to fetch and pass to models.load_pretrained.
_GITHUB = 'https://github.com/microsoft/FocalNet/releases/download/v1.0.0/'
_BLOB = 'https://projects4jw.blob.core.windows.net/focalnet/release/classification/'
_RELEASES = {
    'focalnet_tiny_srf': ('focalnet_tiny_srf.pth', _GITHUB, 'in1k', 224),
    'focalnet_tiny_lrf': ('focalnet_tiny_lrf.pth', _GITHUB, 'in1k', 224),
    'focalnet_small_srf': ('focalnet_small_srf.pth', _GITHUB, 'in1k', 224),
    'focalnet_small_lrf': ('focalnet_small_lrf.pth', _GITHUB, 'in1k', 224),
    'focalnet_base_srf': ('focalnet_base_srf.pth', _GITHUB, 'in1k', 224),
    'focalnet_base_lrf': ('focalnet_base_lrf.pth', _GITHUB, 'in1k', 224),
    'focalnet_tiny_iso': ('focalnet_tiny_iso_16.pth', _BLOB, 'in1k', 224),
    'focalnet_small_iso': ('focalnet_small_iso_16.pth', _BLOB, 'in1k', 224),
    'focalnet_base_iso': ('focalnet_base_iso_16.pth', _BLOB, 'in1k', 224),
    'focalnet_large_fl3': ('focalnet_large_lrf_384.pth', _GITHUB, 'in22k', 384),
    'focalnet_large_fl4': ('focalnet_large_lrf_384_fl4.pth', _GITHUB, 'in22k', 384),
    'focalnet_xlarge_fl3': ('focalnet_xlarge_lrf_384.pth', _GITHUB, 'in22k', 384),
    'focalnet_xlarge_fl4': ('focalnet_xlarge_lrf_384_fl4.pth', _GITHUB, 'in22k', 384),
    'focalnet_huge_fl3': ('focalnet_huge_lrf_224.pth', _BLOB, 'in22k', 224),
    'focalnet_huge_fl4': ('focalnet_huge_lrf_224_fl4.pth', _BLOB, 'in22k', 224),
}

# The large models' overlapping stem and downsamplers, layer scale and post-norm.
_LARGE = dict(use_conv_embed=True, use_layerscale=True, use_postln=True, num_classes=21842,
              depths=(2, 2, 18, 2))


def register(fn: Callable[..., FocalNet]) -> Callable[..., FocalNet]:
    _REGISTRY[fn.__name__] = fn
    return fn


def release_cfg(name: str) -> dict:
    """The release's entries of ``pretrained_cfg``: name, tag, weight file and its address, classes
    (21842 for ImageNet-22K, in the order of timm's 'imagenet-22k-ms' labels) and resolution."""
    file, base, data, size = _RELEASES[name]
    return dict(architecture=name, tag=f'ms_{data}', file=file, url=base + file,
                num_classes=21842 if data == 'in22k' else 1000, input_size=(3, size, size),
                paper_ids='arXiv:2203.11926')


def _build(overrides: dict, **model_args) -> FocalNet:
    model_args.update(overrides)
    return FocalNet(**model_args)


@register
def focalnet_tiny_srf(**kw):
    return _build(kw, embed_dim=96, depths=(2, 2, 6, 2), focal_levels=2, focal_windows=3)


@register
def focalnet_tiny_lrf(**kw):
    return _build(kw, embed_dim=96, depths=(2, 2, 6, 2), focal_levels=3, focal_windows=3)


@register
def focalnet_small_srf(**kw):
    return _build(kw, embed_dim=96, depths=(2, 2, 18, 2), focal_levels=2, focal_windows=3)


@register
def focalnet_small_lrf(**kw):
    return _build(kw, embed_dim=96, depths=(2, 2, 18, 2), focal_levels=3, focal_windows=3)


@register
def focalnet_base_srf(**kw):
    return _build(kw, embed_dim=128, depths=(2, 2, 18, 2), focal_levels=2, focal_windows=3)


@register
def focalnet_base_lrf(**kw):
    return _build(kw, embed_dim=128, depths=(2, 2, 18, 2), focal_levels=3, focal_windows=3)


@register
def focalnet_tiny_iso(**kw):
    return _build(kw, embed_dim=192, depths=(12,), patch_size=16, focal_levels=3, focal_windows=3)


@register
def focalnet_small_iso(**kw):
    return _build(kw, embed_dim=384, depths=(12,), patch_size=16, focal_levels=3, focal_windows=3)


@register
def focalnet_base_iso(**kw):
    # The released weights carry layer scale, post-norm and the modulation's layer norm.
    return _build(kw, embed_dim=768, depths=(12,), patch_size=16, focal_levels=3, focal_windows=3,
                  use_layerscale=True, use_postln=True, use_postln_in_modulation=True)


@register
def focalnet_large_fl3(**kw):
    return _build(kw, embed_dim=192, focal_levels=3, focal_windows=5, **_LARGE)


@register
def focalnet_large_fl4(**kw):
    return _build(kw, embed_dim=192, focal_levels=4, focal_windows=3, normalize_modulator=True,
                  **_LARGE)


@register
def focalnet_xlarge_fl3(**kw):
    return _build(kw, embed_dim=256, focal_levels=3, focal_windows=5, **_LARGE)


@register
def focalnet_xlarge_fl4(**kw):
    return _build(kw, embed_dim=256, focal_levels=4, focal_windows=3, **_LARGE)


@register
def focalnet_huge_fl3(**kw):
    return _build(kw, embed_dim=352, focal_levels=3, focal_windows=3,
                  use_postln_in_modulation=True, **_LARGE)


@register
def focalnet_huge_fl4(**kw):
    return _build(kw, embed_dim=352, focal_levels=4, focal_windows=3,
                  use_postln_in_modulation=True, **_LARGE)


def list_models() -> List[str]:
    return sorted(_REGISTRY)


def _with_cfg(model: FocalNet, cfg: dict) -> FocalNet:
    """``model.pretrained_cfg`` updated with ``cfg``; sizes follow the model actually built."""
    merged = dict(model.pretrained_cfg, **cfg)
    size = merged['input_size'][1:]
    merged['input_size'] = (model.in_chans, *size)
    merged['pool_size'] = tuple(n // model.strides[-1] for n in size)
    merged['num_classes'] = model.num_classes
    model.pretrained_cfg = merged
    return model


def _load_weights(model: FocalNet, path, replace_classifier: bool) -> None:
    from .pretrained import load_pretrained
    load_pretrained(model, path, replace_classifier=replace_classifier)


def create_model(name: str, pretrained: bool = False, checkpoint_path: Union[str, PathLike, None] = None,
                 features_only: bool = False, out_indices: Union[int, Sequence[int], None] = None,
                 feature_cls: str = 'getter', **overrides) -> nn.Module:
    """The released architecture ``name``; any FocalNet constructor argument may be overridden.

    ``checkpoint_path`` loads weights from a file in any layout ``models.load_pretrained`` reads
    (strictly; with ``num_classes`` given, a classifier of another size is replaced, and a 3-channel
    stem is adapted to ``in_chans``). Weights are never downloaded: ``pretrained=True`` is refused
    with the name of the release file to fetch. ``features_only=True`` returns timm's
    ``FeatureGetterNet`` around the model: a list of (B, C, H, W) features ``out_indices`` (default:
    every stage; an isotropic model's blocks 2, 5, 8, 11), with ``feature_info`` describing them.
    """
    if name not in _REGISTRY:
        raise ValueError(f'unknown model {name!r}; known models: {", ".join(list_models())}')
    if pretrained:
        cfg = release_cfg(name)
        raise ValueError(f'{name}: weights are never downloaded; fetch the release file {cfg["file"]} '
                         f'({cfg["url"]}) and pass checkpoint_path=<file>')
    if feature_cls != 'getter':
        raise ValueError(f'feature_cls {feature_cls!r} is not supported; FocalNet features come from '
                         f'forward_intermediates through timm\'s FeatureGetterNet: feature_cls="getter"')
    try:
        model = _REGISTRY[name](**overrides)
    except TypeError as e:
        raise TypeError(f'{name}: {e}') from None
    _with_cfg(model, release_cfg(name))
    if checkpoint_path is not None:
        _load_weights(model, checkpoint_path, replace_classifier='num_classes' in overrides)
    if not features_only:
        return model

    from timm.models._features import FeatureGetterNet  # not re-exported by timm.models
    if out_indices is None:
        out_indices = default_out_indices(len(model.layers), len(model.layers[0].blocks))
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ('num_classes', 'classifier')}
    features = FeatureGetterNet(model, out_indices=out_indices)
    features.pretrained_cfg = features.default_cfg = cfg
    return features


def model_kwargs_from_config(config) -> dict:
    """Every architecture field of a YACS config as FocalNet keyword arguments."""
    m, f = config.MODEL, config.MODEL.FOCAL
    return dict(
        img_size=config.DATA.IMG_SIZE,
        patch_size=f.PATCH_SIZE,
        in_chans=f.IN_CHANS,
        num_classes=m.NUM_CLASSES,
        embed_dim=f.EMBED_DIM,
        depths=tuple(f.DEPTHS),
        mlp_ratio=f.MLP_RATIO,
        drop_rate=m.DROP_RATE,
        drop_path_rate=m.DROP_PATH_RATE,
        patch_norm=f.PATCH_NORM,
        focal_levels=tuple(f.FOCAL_LEVELS),
        focal_windows=tuple(f.FOCAL_WINDOWS),
        focal_factors=tuple(f.FOCAL_FACTORS),
        use_conv_embed=f.USE_CONV_EMBED,
        use_layerscale=f.USE_LAYERSCALE,
        layerscale_value=f.LAYERSCALE_VALUE,
        use_postln=f.USE_POSTLN,
        use_postln_in_modulation=f.USE_POSTLN_IN_MODULATION,
        normalize_modulator=f.NORMALIZE_MODULATOR,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
    )


def build_model(config) -> FocalNet:
    """The network a config describes; the config's architecture fields alone decide it. Its
    ``pretrained_cfg`` describes the config's evaluation transform (resolution, crop, interpolation)."""
    if config.MODEL.TYPE not in ('focalnet', 'focal'):
        raise ValueError(f'unknown MODEL.TYPE {config.MODEL.TYPE!r}; expected "focalnet"')
    model = FocalNet(**model_kwargs_from_config(config))
    size = config.DATA.IMG_SIZE
    interpolation = config.DATA.INTERPOLATION
    return _with_cfg(model, dict(
        architecture=config.MODEL.NAME, input_size=(3, size, size),
        crop_pct=0.875 if config.TEST.CROP else 1.0,
        interpolation='bilinear' if interpolation == 'random' else interpolation))
