"""Layer-wise learning-rate decay (TRAIN.LAYER_DECAY) through build_optimizer and the schedulers."""
import pytest
import torch

import config as cfg
from errors import UserError
from lr_scheduler import build_scheduler
from models import create_model
from optimizer import build_optimizer, param_groups

DEPTHS = (1, 1, 2, 1)  # five blocks


def model():
    return create_model('focalnet_large_fl3', embed_dim=8, depths=DEPTHS, num_classes=4)


def expected_scale(name: str, decay: float) -> float:
    """The classifier learns at the full rate; each block below it at ``decay`` times the rate of the
    block above; a downsampling with the last block of its stage, the final norm with the last
    block of the network; the stem one step below the first block."""
    blocks = sum(DEPTHS)
    if name.startswith('head.'):
        return 1.0
    if name.startswith('norm.'):
        return decay
    if name.startswith('patch_embed.'):
        return decay ** (blocks + 1)
    stage = int(name.split('.')[1])
    if '.downsample.' in name:
        block = DEPTHS[stage] - 1
    else:
        block = int(name.split('.')[3])
    index = sum(DEPTHS[:stage]) + block  # 0 .. blocks - 1
    return decay ** (blocks - index)


def rates(optimizer, net):
    names = {id(p): n for n, p in net.named_parameters()}
    return {names[id(p)]: (g['lr'], g['weight_decay']) for g in optimizer.param_groups for p in g['params']}


def test_layer_decay_scales_the_schedule_per_block():
    torch.manual_seed(0)
    net = model()
    common = ['TRAIN.BASE_LR', '1e-3', 'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.EPOCHS', '4']
    plain_cfg = cfg.load_config(None, common)
    decay_cfg = cfg.load_config(None, common + ['TRAIN.LAYER_DECAY', '0.5'])
    plain = build_optimizer(plain_cfg, net, lr_scale=2.0)
    decayed = build_optimizer(decay_cfg, net, lr_scale=2.0)
    assert decayed.param_groups[0]['lr'] == plain.param_groups[0]['lr'] == pytest.approx(2e-3)
    schedules = [build_scheduler(c, o, steps_per_epoch=10, lr_scale=2.0)
                 for c, o in ((plain_cfg, plain), (decay_cfg, decayed))]
    for step in (0, 5, 10, 25, 39):
        for s in schedules:
            s.step_update(step)
        base = plain.param_groups[0]['lr']
        got, want = rates(decayed, net), rates(plain, net)
        assert got.keys() == want.keys() == {n for n, _ in net.named_parameters()}
        for name, (lr, wd) in got.items():
            assert lr == pytest.approx(base * expected_scale(name, 0.5), rel=1e-9), (step, name)
            assert wd == want[name][1], name  # weight decay as without layer decay
    # The first group runs at the schedule's own rate, which main.py logs.
    assert decayed.param_groups[0]['lr'] == pytest.approx(plain.param_groups[0]['lr'])


def test_layer_decay_groups_as_timm_builds_them():
    from timm.optim import param_groups_layer_decay
    net = model()
    ours = param_groups(net, 0.05, layer_decay=0.75)
    theirs = param_groups_layer_decay(net, 0.05, no_weight_decay_list=net.no_weight_decay(), layer_decay=0.75)

    def by_param(groups):
        return {id(p): (round(g['lr_scale'], 12), g['weight_decay']) for g in groups for p in g['params']}
    assert by_param(ours) == by_param(theirs)
    assert len({scale for scale, _ in by_param(ours).values()}) == sum(DEPTHS) + 2  # stem, blocks, head


def test_coarse_groups_are_stages():
    from timm.models import group_parameters
    net = model()
    groups = group_parameters(net, net.group_matcher(coarse=True))
    names = [sorted({n.split('.')[0] + ('.' + n.split('.')[1] if n.startswith('layers') else '')
                     for n in g}) for g in groups.values()]
    assert names == [['patch_embed'], ['layers.0'], ['layers.1'], ['layers.2'], ['layers.3', 'norm'],
                     ['head']]


def test_bad_layer_decay_is_named():
    c = cfg.load_config(None, ['TRAIN.LAYER_DECAY', '1.5'])
    with pytest.raises(UserError, match='TRAIN.LAYER_DECAY'):
        build_optimizer(c, model())
    assert cfg.defaults().TRAIN.LAYER_DECAY == 1.0  # off by default
