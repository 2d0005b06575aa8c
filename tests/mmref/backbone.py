"""This codebase's dense FocalNet as mmdetection's ``FocalNet`` backbone, for the reference runs.

mmdetection has no FocalNet; the official configs name ``type='FocalNet'`` with the official dense
backbone's keyword arguments, which ``models.FocalNetDense`` takes too (and whose parameter names are
the official ones). Registering it lets mmdetection build an official config unchanged and run its
necks and heads on the very backbone the tests then load: the comparison is of everything after it.
"""


def register_focalnet(registry=None):
    """Register ``FocalNet`` in mmdetection's MODELS (or ``registry``); idempotent. Returns the class."""
    from models.dense import FocalNetDense
    if registry is None:
        from mmdet.registry import MODELS as registry
    existing = registry.get('FocalNet')
    if existing is not None:
        return existing

    class FocalNet(FocalNetDense):
        # Keyword arguments the official dense backbone takes that have no effect on the network.
        IGNORED = ('pretrained', 'init_cfg', 'frozen_stages')

        def __init__(self, **kwargs):
            for key in self.IGNORED:
                kwargs.pop(key, None)
            super().__init__(**kwargs)

        def init_weights(self):
            """The weights are set by the generator; mmengine's initialisation leaves them alone."""

        def forward(self, x):
            return tuple(super().forward(x))

    registry.register_module(name='FocalNet', module=FocalNet)
    return FocalNet
