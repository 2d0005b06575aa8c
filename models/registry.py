"""The released FocalNet architectures by name, and the builders that read them or a config."""
from typing import Callable, Dict, List

from .focalnet import FocalNet

_REGISTRY: Dict[str, Callable[..., FocalNet]] = {}

# The large models' overlapping stem and downsamplers, layer scale and post-norm.
_LARGE = dict(use_conv_embed=True, use_layerscale=True, use_postln=True, num_classes=21842,
              depths=(2, 2, 18, 2))


def register(fn: Callable[..., FocalNet]) -> Callable[..., FocalNet]:
    _REGISTRY[fn.__name__] = fn
    return fn


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


def create_model(name: str, **overrides) -> FocalNet:
    """The released architecture ``name``; any FocalNet constructor argument may be overridden."""
    if name not in _REGISTRY:
        raise ValueError(f'unknown model {name!r}; known models: {", ".join(list_models())}')
    try:
        return _REGISTRY[name](**overrides)
    except TypeError as e:
        raise TypeError(f'{name}: {e}') from None


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
    """The network a config describes; the config's architecture fields alone decide it."""
    if config.MODEL.TYPE not in ('focalnet', 'focal'):
        raise ValueError(f'unknown MODEL.TYPE {config.MODEL.TYPE!r}; expected "focalnet"')
    return FocalNet(**model_kwargs_from_config(config))
