"""The FocalNet dense backbone in mmdetection's model registry, for reference runs of mmdetection's
detectors (tests/mmref/make_mmdet_fixtures.py and any other generator that builds an mmdetection
config with ``backbone=dict(type='FocalNet', ...)``).

mmdetection has no FocalNet. The official detection code registers its own backbone class; ours,
``models.FocalNetDense``, equals it (tests/test_dense_backbone.py compares them to 4e-7) and has the
same parameter names, so a state dict saved from an mmdetection model built with it has the released
checkpoints' ``backbone.*`` keys. Run with /work/venv-mm/bin/python after ``shim.install()``.
"""
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def register_focalnet(name: str = 'FocalNet'):
    """Register FocalNetDense as ``name`` in mmdetection's MODELS (idempotent); return the class.

    The config's keyword arguments are the official backbone's (embed_dim, depths, focal_levels,
    focal_windows, out_indices, drop_path_rate, use_conv_embed, use_layerscale, use_postln, ...);
    ``pretrained`` and ``init_cfg`` are accepted and must be empty (nothing is downloaded)."""
    if _REPO not in sys.path:
        sys.path.insert(0, _REPO)
    from mmdet.registry import MODELS
    from models.dense import FocalNetDense

    existing = MODELS.module_dict.get(name)
    if existing is not None:
        return existing

    class FocalNet(FocalNetDense):
        def __init__(self, pretrained=None, init_cfg=None, frozen_stages=-1, **kwargs):
            if pretrained or init_cfg:
                raise ValueError('the reference backbone loads no weights; got '
                                 f'pretrained={pretrained!r}, init_cfg={init_cfg!r}')
            if frozen_stages != -1:
                raise ValueError(f'frozen_stages={frozen_stages} is not supported here')
            super().__init__(**kwargs)

        def init_weights(self):
            pass  # FocalNetDense initialises itself as the official backbone does

        def forward(self, x):
            return tuple(super().forward(x))  # mmdetection's necks take a tuple of maps

    FocalNet.__name__ = name
    MODELS.register_module(name=name, module=FocalNet)
    return FocalNet
