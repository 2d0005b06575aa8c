"""Loading released weights: the three layouts, every file format, strictness and safe reading."""
import argparse
import json
import os

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.focalnet import FocalNet as TimmFocalNet
from transformers import FocalNetConfig, FocalNetForImageClassification, FocalNetModel
from yacs.config import CfgNode

from models import CheckpointError, FocalNet, convert_state_dict, load_pretrained, read_state_file
from models.pretrained import to_hf, to_timm

TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), focal_levels=(2, 3, 3, 4), focal_windows=(3, 3, 5, 1))
# Every option of the large and huge releases at once.
LARGE = dict(use_conv_embed=True, use_layerscale=True, use_postln=True,
             use_postln_in_modulation=True, normalize_modulator=True)
MULTI_STAGE_CASES = ['srf', 'lrf', 'mixed_levels', 'normalize_modulator', 'large_style',
                     'large_fl4_style', 'huge_style', 'non_square_96x64']
ALL_CASES = MULTI_STAGE_CASES + ['iso', 'iso_base_style']


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def perturbed(model):
    """Every tensor moved off its initial value, so a swapped or dropped norm or scale shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def ours(num_classes=10, large=False, **kw):
    return FocalNet(**{**TINY, **(LARGE if large else {}), **kw}, num_classes=num_classes,
                    drop_path_rate=0.).eval()


def timm_model(num_classes=10, large=False, **kw):
    return TimmFocalNet(
        **{**TINY, **kw}, num_classes=num_classes, drop_path_rate=0., use_overlap_down=large,
        use_post_norm=large, use_post_norm_in_modulation=large, normalize_modulator=large,
        layerscale_value=1e-4 if large else None).eval()


def hf_config(num_labels=10, large=False, **kw):
    arch = {**TINY, **kw}
    return FocalNetConfig(
        embed_dim=arch['embed_dim'], depths=list(arch['depths']),
        focal_levels=list(arch['focal_levels']), focal_windows=list(arch['focal_windows']),
        patch_size=arch.get('patch_size', 4), num_labels=num_labels, image_size=64,
        drop_path_rate=0., use_conv_embed=large, use_layerscale=large, use_post_layernorm=large,
        use_post_layernorm_in_modulation=large, normalize_modulator=large)


def save(state, path):
    if path.suffix == '.safetensors':
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def assert_same_tensors(model, state):
    got = model.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


# ---- official layout --------------------------------------------------------------------------------

@pytest.mark.parametrize('suffix,wrapped', [('.pth', True), ('.pth', False), ('.pt', True),
                                            ('.bin', False), ('.safetensors', False)])
def test_official_round_trip(tmp_path, suffix, wrapped):
    src = perturbed(ours(large=True))
    state = src.state_dict()
    if wrapped:  # what the official training code writes, yacs config object included
        opt = torch.optim.AdamW(src.parameters())
        content = {'model': state, 'optimizer': opt.state_dict(), 'epoch': 3, 'max_accuracy': 81.2,
                   'config': CfgNode({'MODEL': CfgNode({'NAME': 'tiny'}), 'SEED': 0})}
    else:
        content = state
    dst = ours(large=True)
    report = load_pretrained(dst, save(content, tmp_path / f'w{suffix}'))
    assert report['layout'] == 'official'
    assert report['missing'] == report['unexpected'] == [] and not report['replaced_classifier']
    assert_same_tensors(dst, state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_legacy_torch_format(tmp_path):
    """Files written before torch 1.6 (a bare pickle stream, not a zip archive) load too."""
    src = perturbed(ours())
    path = tmp_path / 'old.pth'
    torch.save({'model': src.state_dict()}, path, _use_new_zipfile_serialization=False)
    dst = ours()
    assert load_pretrained(dst, path)['layout'] == 'official'
    assert_same_tensors(dst, src.state_dict())


def test_distributed_prefix_is_removed(tmp_path):
    src = perturbed(ours())
    path = save({'model': {'module.' + k: v for k, v in src.state_dict().items()}}, tmp_path / 'w.pth')
    dst = ours()
    load_pretrained(dst, path)
    assert_same_tensors(dst, src.state_dict())


@pytest.mark.parametrize('case', ['srf', 'huge_style', 'iso_base_style'])
def test_reference_case_file_loads(reference, case):
    """The reference files hold their weights under 'state_dict' next to inputs and outputs."""
    data = torch.load(reference / 'cases' / f'{case}.pt', weights_only=True)
    c = data['config']
    model = FocalNet(patch_size=c['PATCH_SIZE'], num_classes=c['NUM_CLASSES'], embed_dim=c['EMBED_DIM'],
                     depths=c['DEPTHS'], focal_levels=c['FOCAL_LEVELS'],
                     focal_windows=c['FOCAL_WINDOWS'], use_conv_embed=c['USE_CONV_EMBED'],
                     use_layerscale=c['USE_LAYERSCALE'], use_postln=c['USE_POSTLN'],
                     use_postln_in_modulation=c['USE_POSTLN_IN_MODULATION'],
                     normalize_modulator=c['NORMALIZE_MODULATOR'], drop_path_rate=0.).eval()
    assert load_pretrained(model, reference / 'cases' / f'{case}.pt')['layout'] == 'official'
    with torch.no_grad():
        assert rel_err(model(data['input']), data['logits']) < 1e-5


# ---- timm layout ------------------------------------------------------------------------------------

@pytest.mark.parametrize('large', [False, True], ids=['srf_style', 'large_style'])
@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_timm_weights_give_timm_logits(tmp_path, large, suffix):
    t = perturbed(timm_model(large=large))
    content = t.state_dict()
    if suffix == '.pth':  # what timm's train.py writes, its argparse namespace included
        content = {'state_dict': content, 'epoch': 5, 'arch': 'focalnet_tiny_srf',
                   'args': argparse.Namespace(lr=1e-3, model='focalnet_tiny_srf', input_size=None)}
    model = ours(large=large)
    report = load_pretrained(model, save(content, tmp_path / f't{suffix}'))
    assert report['layout'] == 'timm'
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), t(x)) < 1e-5
    # And back: the export is what timm itself loads strictly, tensor for tensor.
    back = timm_model(large=large)
    back.load_state_dict(to_timm(model.state_dict(), use_postln=large), strict=True)
    assert_same_tensors(back, t.state_dict())


def _case(reference, case):
    data = torch.load(reference / 'cases' / f'{case}.pt', weights_only=True)
    c = data['config']
    arch = dict(embed_dim=c['EMBED_DIM'], depths=tuple(c['DEPTHS']),
                focal_levels=tuple(c['FOCAL_LEVELS']), focal_windows=tuple(c['FOCAL_WINDOWS']))
    return data, c, arch


@pytest.mark.parametrize('case', MULTI_STAGE_CASES)
def test_official_weights_in_timm_give_official_logits(reference, case):
    """The export to timm against the official implementation's own outputs, not our model's."""
    data, c, arch = _case(reference, case)
    t = TimmFocalNet(**arch, num_classes=c['NUM_CLASSES'], drop_path_rate=0.,
                     use_overlap_down=c['USE_CONV_EMBED'], use_post_norm=c['USE_POSTLN'],
                     use_post_norm_in_modulation=c['USE_POSTLN_IN_MODULATION'],
                     normalize_modulator=c['NORMALIZE_MODULATOR'],
                     layerscale_value=1e-4 if c['USE_LAYERSCALE'] else None).eval()
    t.load_state_dict(to_timm(data['state_dict'], use_postln=c['USE_POSTLN']), strict=True)
    with torch.no_grad():
        assert rel_err(t(data['input']), data['logits']) < 1e-5


# ---- HF transformers layout -------------------------------------------------------------------------

@pytest.mark.parametrize('large', [False, True], ids=['srf_style', 'large_style'])
def test_hf_weights_give_hf_logits(tmp_path, large):
    h = perturbed(FocalNetForImageClassification(hf_config(large=large)))
    h.save_pretrained(tmp_path / 'hf')  # a directory with model.safetensors
    torch.save(h.state_dict(), tmp_path / 'pytorch_model.bin')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = h(pixel_values=x).logits
    for path in (tmp_path / 'hf', tmp_path / 'hf' / 'model.safetensors', tmp_path / 'pytorch_model.bin'):
        model = ours(large=large)
        assert load_pretrained(model, path)['layout'] == 'hf'
        with torch.no_grad():
            assert rel_err(model(x), expected) < 1e-5, path
    back = FocalNetForImageClassification(hf_config(large=large))
    back.load_state_dict(to_hf(model.state_dict()), strict=True)
    assert_same_tensors(back, h.state_dict())


def test_hf_sharded_directory(tmp_path):
    h = perturbed(FocalNetForImageClassification(hf_config()))
    h.save_pretrained(tmp_path, max_shard_size='100KB')
    assert len(list(tmp_path.glob('*.safetensors'))) > 1  # really sharded
    model = ours()
    load_pretrained(model, tmp_path)
    assert_same_tensors(model, convert_state_dict(h.state_dict())[0])


@pytest.mark.parametrize('case', ALL_CASES)
def test_official_weights_in_hf_give_official_logits(reference, case):
    data, c, arch = _case(reference, case)
    config = hf_config(num_labels=c['NUM_CLASSES'], patch_size=c['PATCH_SIZE'], **arch)
    config.use_conv_embed = c['USE_CONV_EMBED']
    config.use_layerscale = c['USE_LAYERSCALE']
    config.use_post_layernorm = c['USE_POSTLN']
    config.use_post_layernorm_in_modulation = c['USE_POSTLN_IN_MODULATION']
    config.normalize_modulator = c['NORMALIZE_MODULATOR']
    h = FocalNetForImageClassification(config).eval()
    h.load_state_dict(to_hf(data['state_dict']), strict=True)
    with torch.no_grad():
        assert rel_err(h(pixel_values=data['input']).logits, data['logits']) < 1e-5


# Every distinct option set among the releases (the isotropic ones have no timm counterpart).
RELEASES = ['focalnet_tiny_srf', 'focalnet_base_lrf', 'focalnet_base_iso', 'focalnet_large_fl4',
            'focalnet_xlarge_fl3', 'focalnet_huge_fl4']


@pytest.mark.parametrize('name', RELEASES)
def test_release_layout_maps_onto_timm_and_hf_models(reference, name):
    """Full-size releases, key for key and shape for shape, built on the meta device (no memory)."""
    keys = reference / 'official_state_dict_keys'
    arch = json.loads((keys / 'summary.json').read_text())[name]['constructor_arguments_of_the_release']
    state = {}
    for line in (keys / f'{name}.txt').read_text().splitlines():
        key, shape = line.split('\t')
        state[key] = torch.empty(json.loads(shape), device='meta')
    converted, layout = convert_state_dict(state)
    assert layout == 'official' and converted.keys() == state.keys()
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    num_classes = state['head.weight'].shape[0]
    with torch.device('meta'):
        if not name.endswith('_iso'):
            t = timm.create_model(name, num_classes=num_classes)
            assert shapes(to_timm(state, use_postln=arch.get('use_postln', False))) == shapes(t.state_dict())
        h = FocalNetForImageClassification(FocalNetConfig(
            embed_dim=arch['embed_dim'], depths=arch['depths'], focal_levels=arch['focal_levels'],
            focal_windows=arch['focal_windows'], patch_size=arch['patch_size'], num_labels=num_classes,
            use_conv_embed=arch.get('use_conv_embed', False),
            use_layerscale=arch.get('use_layerscale', False),
            use_post_layernorm=arch.get('use_postln', False),
            use_post_layernorm_in_modulation=arch.get('use_postln_in_modulation', False)))
        assert shapes(to_hf(state)) == shapes(h.state_dict())
    # And back: each export converts to the released layout exactly.
    if not name.endswith('_iso'):
        assert shapes(convert_state_dict(to_timm(state, use_postln=arch.get('use_postln', False)))[0]) \
            == shapes(state)
    assert shapes(convert_state_dict(to_hf(state))[0]) == shapes(state)


def test_hf_backbone_only_needs_replace_classifier(tmp_path):
    bare = perturbed(FocalNetModel(hf_config()))
    path = save(bare.state_dict(), tmp_path / 'bare.safetensors')
    with pytest.raises(CheckpointError, match='no classifier.*replace_classifier=True'):
        load_pretrained(ours(), path)
    model = ours()
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    report = load_pretrained(model, path, replace_classifier=True)
    assert report['layout'] == 'hf' and report['replaced_classifier']
    assert_same_tensors(model.head, head)
    # A model built without a classifier takes the backbone as it is.
    assert not load_pretrained(ours(num_classes=0), path)['replaced_classifier']


def test_convert_state_dict_without_a_model():
    t = timm_model(large=True)
    converted, layout = convert_state_dict({'state_dict': t.state_dict()})
    assert layout == 'timm'
    assert converted.keys() == ours(large=True).state_dict().keys()
    assert converted['layers.0.blocks.0.modulation.f.weight'].shape == (16 * 2 + 3, 16)
    with pytest.raises(CheckpointError, match='known layout'):
        convert_state_dict({'encoder.weight': torch.zeros(1)})
    with pytest.raises(CheckpointError, match='timm has no FocalNet with a 16x16 patch'):
        to_timm(ours(patch_size=16, depths=(2,), focal_levels=3, focal_windows=3).state_dict(),
                use_postln=False)


# ---- strictness -------------------------------------------------------------------------------------

def test_mismatch_names_keys_and_shapes(tmp_path):
    depths = (1, 1, 3, 1)
    path = save(ours(focal_levels=2, depths=depths).state_dict(), tmp_path / 'w.pth')
    with pytest.raises(CheckpointError) as err:
        load_pretrained(ours(focal_levels=3, depths=depths), path)
    msg = str(err.value)
    assert str(path) in msg
    assert 'layers.0.blocks.0.modulation.f.weight file [35, 16] vs model [36, 16]' in msg
    assert 'missing from the file:\n    layers.0.blocks.0.modulation.focal_layers.2.0.weight' in msg
    assert '... and ' in msg  # 12 shape mismatches: ten listed, the rest counted


def test_unexpected_keys_are_named_in_the_files_layout(tmp_path):
    t = timm_model(large=True).state_dict()
    path = save(t, tmp_path / 't.pth')
    with pytest.raises(CheckpointError, match=r'layers\.0\.blocks\.0\.gamma_1 \(file: '
                                               r'layers\.0\.blocks\.0\.ls1\.gamma\) \[16\]'):
        load_pretrained(ours(large=False), path)


def test_head_replaced_only_on_request(tmp_path):
    src = perturbed(ours(num_classes=10))
    path = save({'model': src.state_dict()}, tmp_path / 'w.pth')
    model = ours(num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, path)
    assert 'head.weight file [10, 128] vs model [5, 128]' in str(err.value)
    assert 'replace_classifier=True' in str(err.value)
    assert_same_tensors(model, before)  # untouched

    report = load_pretrained(model, path, replace_classifier=True)
    assert report['replaced_classifier'] and report['dropped'] == ['head.weight', 'head.bias']
    state = model.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(state[k], before[k] if k.startswith('head.') else v), k


def test_replace_classifier_keeps_a_fitting_head(tmp_path):
    src = perturbed(ours())
    model = ours()
    report = load_pretrained(model, save(src.state_dict(), tmp_path / 'w.pth'), replace_classifier=True)
    assert not report['replaced_classifier']
    assert_same_tensors(model, src.state_dict())


def test_replace_classifier_does_not_excuse_other_mismatches(tmp_path):
    path = save(ours(num_classes=10, embed_dim=8).state_dict(), tmp_path / 'w.pth')
    with pytest.raises(CheckpointError, match='of another shape'):
        load_pretrained(ours(num_classes=5), path, replace_classifier=True)


# ---- safe reading -----------------------------------------------------------------------------------

class _OpensAFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return open, (self.target, 'w')


class _RunsAShellCommand:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f'touch {self.target}',)


@pytest.mark.parametrize('payload,named', [(_OpensAFile, 'open'), (_RunsAShellCommand, 'system')])
def test_code_carrying_pickle_is_refused_and_not_run(tmp_path, payload, named):
    target = tmp_path / 'created_by_unpickling'
    path = tmp_path / 'evil.pth'
    torch.save({'model': ours().state_dict(), 'extra': payload(target)}, path)
    assert not target.exists()
    with pytest.raises(CheckpointError) as err:
        load_pretrained(ours(), path)
    msg = str(err.value)
    assert 'refused' in msg and str(path) in msg
    assert 'Python global' in msg and named in msg.split('Python global')[1].split(')')[0]
    assert not target.exists()
    with pytest.raises(CheckpointError, match='refused'):
        read_state_file(path)
    assert not target.exists()


def test_unreadable_files_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match='not found') as err:
        load_pretrained(ours(), tmp_path / 'absent.pth')
    assert str(tmp_path / 'absent.pth') in str(err.value)

    good = save(ours().state_dict(), tmp_path / 'good.pth')
    good_st = save(ours().state_dict(), tmp_path / 'good.safetensors')
    for src, name in ((good, 'cut.pth'), (good_st, 'cut.safetensors')):
        data = src.read_bytes()
        (tmp_path / name).write_bytes(data[:len(data) // 2])
        with pytest.raises(CheckpointError, match='truncated') as err:
            read_state_file(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)

    (tmp_path / 'notes.txt').write_text(json.dumps({'weights': 'none'}))
    with pytest.raises(CheckpointError, match='not a PyTorch checkpoint'):
        read_state_file(tmp_path / 'notes.txt')
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty'):
        read_state_file(tmp_path / 'empty.pth')
    torch.save([torch.zeros(1)], tmp_path / 'list.pth')
    with pytest.raises(CheckpointError, match='not a state dict'):
        load_pretrained(ours(), tmp_path / 'list.pth')


# ---- stem adaptation --------------------------------------------------------------------------------

@pytest.mark.parametrize('in_chans', [1, 2, 4, 6])
@pytest.mark.parametrize('large', [False, True], ids=['patch_stem', 'conv_stem'])
def test_rgb_stem_adapted_to_other_inputs(tmp_path, in_chans, large):
    """As timm adapts stems (its adapt_input_conv is the reference); everything else stays strict."""
    from timm.models import adapt_input_conv as timm_adapt
    src = perturbed(ours(large=large))
    path = save({'model': src.state_dict()}, tmp_path / 'rgb.pth')
    model = ours(large=large, in_chans=in_chans)
    report = load_pretrained(model, path)
    assert report['adapted'] == [f'patch_embed.proj.weight: 3 -> {in_chans} input channels']
    rgb = src.state_dict()['patch_embed.proj.weight']
    assert torch.equal(model.state_dict()['patch_embed.proj.weight'], timm_adapt(in_chans, rgb))
    if in_chans == 1:  # a grey image gives what the RGB model gives for it in all three channels
        grey = torch.rand(2, 1, 64, 64)
        with torch.no_grad():
            assert rel_err(model(grey), src(grey.expand(-1, 3, -1, -1))) < 1e-5


def test_only_rgb_stems_are_adapted(tmp_path):
    path = save(perturbed(ours(in_chans=1)).state_dict(), tmp_path / 'grey.pth')
    with pytest.raises(CheckpointError, match=r'patch_embed.proj.weight file \[16, 1, 4, 4\] vs model \[16, 3, 4, 4\]'):
        load_pretrained(ours(), path)
    assert load_pretrained(ours(), save(ours().state_dict(), tmp_path / 'rgb.pth'))['adapted'] == []
