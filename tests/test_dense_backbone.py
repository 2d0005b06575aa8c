"""The dense (detection / segmentation) backbone against the official dense backbone's reference data."""
import pytest
import torch

from models import FocalNetDense, build_dense_backbone, init_from_classification, load_dense_checkpoint
from models.pretrained import CheckpointError

BACKBONES = ['maskrcnn_tiny_srf', 'maskrcnn_tiny_lrf', 'atss_tiny_lrf', 'upernet_tiny_srf']
TOL = 1e-5


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def load_case(reference, name):
    return torch.load(reference / 'dense' / f'{name}.pt', weights_only=True)


def reference_backbone(case) -> FocalNetDense:
    model = FocalNetDense(**case['config'])
    load_dense_checkpoint(model, case['state_dict'])
    return model.eval()


@pytest.mark.parametrize('name', BACKBONES)
def test_outputs_and_modulators_match_official(name, reference):
    case = load_case(reference, name)
    model = reference_backbone(case)
    with torch.no_grad():
        for key in ('', '_224', '_99x75'):
            outs = model(case[f'input{key}'])
            expected = case[f'outputs{key}']
            assert [o.shape for o in outs] == [e.shape for e in expected]
            for out, exp in zip(outs, expected):
                assert rel_err(out, exp) < TOL, (key, rel_err(out, exp))
        blocks = [tuple(b) for b in case['block_modulators_index']]
        outs, maps = model.modulation_maps(case['input'], blocks)
    for block, exp in zip(blocks, case['block_modulators']):
        got = maps[block]['modulator']
        assert got.shape == exp.shape
        assert rel_err(got, exp) < TOL, (block, rel_err(got, exp))
    for out, exp in zip(outs, case['outputs']):  # the maps do not change the outputs
        assert rel_err(out, exp) < TOL


@pytest.mark.parametrize('name', BACKBONES)
def test_release_layout(name, reference):
    case = load_case(reference, name)
    with torch.device('meta'):
        model = FocalNetDense(**case['release_config'])
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == case['state_dict_keys_release']
    assert sum(p.numel() for p in model.parameters()) == case['release_num_params']


def test_mmdet_checkpoint_loads_backbone_strictly(reference, tmp_path):
    case = load_case(reference, 'maskrcnn_tiny_lrf')
    state = {f'backbone.{k}': v for k, v in case['state_dict'].items()}
    state.update({'neck.lateral_convs.0.conv.weight': torch.zeros(4, 8, 1, 1),
                  'neck.lateral_convs.0.conv.bias': torch.zeros(4),
                  'rpn_head.rpn_cls.weight': torch.zeros(3, 4, 1, 1)})
    path = tmp_path / 'mask_rcnn.pth'
    torch.save({'meta': {'epoch': 12, 'CLASSES': ('a', 'b')}, 'state_dict': state}, path)
    model = FocalNetDense(**case['config'])
    report = load_dense_checkpoint(model, path)
    assert report['dropped'] == {'neck': 2, 'rpn_head': 1}
    assert report['num_tensors'] == len(case['state_dict'])
    with torch.no_grad():
        out = model.eval()(case['input'])
    assert rel_err(out[0], case['outputs'][0]) < TOL

    # An SRF checkpoint in an LRF backbone: every offending key is named, nothing is loaded.
    srf = load_case(reference, 'maskrcnn_tiny_srf')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r'focal_layers\.2\.0\.weight') as info:
        load_dense_checkpoint(model, {'state_dict': {f'backbone.{k}': v for k, v in srf['state_dict'].items()}})
    assert 'modulation.f.weight file [19, 8] vs model [20, 8]' in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # The ATSS backbone has no norm0: the error says why.
    atss = load_case(reference, 'atss_tiny_lrf')
    with pytest.raises(CheckpointError, match='out_indices'):
        load_dense_checkpoint(FocalNetDense(**{**atss['config'], 'out_indices': (0, 1, 2, 3)}),
                              atss['state_dict'])


@pytest.mark.parametrize('variant', ['a', 'b'])
def test_init_from_classification_matches_official(variant, reference, tmp_path):
    ref = load_case(reference, 'init_from_classification')
    case = ref[variant]
    path = tmp_path / 'classifier.pth'
    torch.save({'model': ref['classification_state_dict']}, path)
    model = FocalNetDense(**case['config'])
    report = init_from_classification(model, path)
    assert report['layout'] == 'official'
    assert sorted(report['added']) == sorted(case['missing_keys'])
    assert sorted(report['dropped']) == sorted(case['unexpected_keys'])
    assert len(report['padded']) == sum(1 for k in ref['classification_state_dict'] if 'focal_layers' in k)
    assert len(report['expanded']) == (10 if variant == 'b' else 0)  # f weight and bias of 5 blocks
    ours = model.state_dict()
    assert list(ours) == list(case['state_dict'])
    for key, expected in case['state_dict'].items():
        if key in case['missing_keys'] and 'focal_layers' in key:
            continue  # a new level's kernel keeps its random init in both implementations
        assert torch.equal(ours[key], expected), key
    # With the new levels' random kernels taken from the reference, the outputs agree.
    model.load_state_dict(case['state_dict'])
    with torch.no_grad():
        outs = model.eval()(ref['input'])
    for out, exp in zip(outs, case['outputs']):
        assert rel_err(out, exp) < TOL


def test_init_from_classification_refuses_what_does_not_fit(reference):
    ref = load_case(reference, 'init_from_classification')
    state = ref['classification_state_dict']
    # More focal levels in the file than in the backbone: the official code raises too.
    with pytest.raises(CheckpointError, match='more focal levels'):
        init_from_classification(FocalNetDense(**{**ref['a']['config'], 'focal_levels': [1] * 4}), state)
    # Another width is not silently skipped.
    with pytest.raises(CheckpointError, match='of another shape'):
        init_from_classification(FocalNetDense(**{**ref['a']['config'], 'embed_dim': 16}), state)


def test_gradient_checkpointing_and_training_mode():
    torch.manual_seed(0)
    model = FocalNetDense(embed_dim=8, depths=(1, 1, 2, 1), focal_levels=3, drop_path_rate=0.0)
    x = torch.randn(2, 3, 70, 45)
    outs = model(x)
    sum(o.square().mean() for o in outs).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for n, g in grads.items()), [n for n, g in grads.items() if g.abs().sum() == 0]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    outs_ckpt = model(x)
    sum(o.square().mean() for o in outs_ckpt).backward()
    for a, b in zip(outs, outs_ckpt):
        assert torch.allclose(a, b, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6, rtol=1e-5), n
    assert [o.shape[-2:] for o in outs] == [(18, 12), (9, 6), (5, 3), (3, 2)]


def test_builder_reads_the_focal_keys():
    from config import load_config
    config = load_config(opts=['MODEL.FOCAL.EMBED_DIM', '16', 'MODEL.FOCAL.DEPTHS', '[1, 1, 1, 1]',
                               'MODEL.FOCAL.FOCAL_WINDOWS', '[9, 9, 9, 9]', 'MODEL.FOCAL.FOCAL_LEVELS',
                               '[3, 3, 3, 3]', 'MODEL.DROP_PATH_RATE', '0.3'])
    model = build_dense_backbone(config, out_indices=(1, 2, 3))
    assert model.out_channels == [32, 64, 128] and model.strides == [8, 16, 32]
    assert [k for k in model.state_dict() if k.startswith('norm')] == [
        f'norm{i}.{p}' for i in (1, 2, 3) for p in ('weight', 'bias')]
    kernels = model.layers[0].blocks[0].modulation.focal_layers
    assert [layer[0].kernel_size for layer in kernels] == [(9, 9), (11, 11), (13, 13)]
    assert model.layers[3].blocks[0].drop_path.drop_prob == pytest.approx(0.3)
    with pytest.raises(ValueError, match='out_indices'):
        build_dense_backbone(config, out_indices=(1, 4))
