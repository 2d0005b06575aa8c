"""The segmentor against mmsegmentation itself: heads, inference modes, losses and training transforms
compared with what mmsegmentation computed for the same random-weight UPerNet, inputs and random draws.

The fixtures under tests/fixtures/mmseg/ are written by tests/mmref/make_mmseg_fixtures.py in the
reference environment (requirements-mmref.txt; meta.json records the versions); these tests need
neither mmsegmentation nor mmcv.
"""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision import tv_tensors
from torchvision.transforms import v2

import config as cfg
from segmentation.checkpoint import load_segmentor_weights
from segmentation.data import reduce_zero_label
from segmentation.inference import predict_probs, slide_logits
from segmentation.model import build_segmentor
from segmentation.transforms import (CatMaxRatioCrop, PhotoMetricDistortion, RandomRescale,
                                     build_train_transform, normalize, rescale_size)

pytestmark = pytest.mark.usefixtures('fixture_threads')

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / 'tests' / 'fixtures' / 'mmseg'
TINY_CFG = str(ROOT / 'configs' / 'segmentation' / 'upernet_focalnet_tiny_srf_160k.yaml')
META = json.loads((FIXTURES / 'meta.json').read_text())
TEST, TRAIN = META['test'], META['train']


def load(name):
    return torch.load(FIXTURES / name, weights_only=True)


def relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.fixture(scope='module')
def config():
    return cfg.load_config(TINY_CFG, META['model_opts'])


@pytest.fixture(scope='module')
def model(config):
    """The segmentor the release config builds, with mmsegmentation's random weights loaded from the
    released layout (strictly, through segmentation/checkpoint.py)."""
    model = build_segmentor(config)
    load_segmentor_weights(model, str(FIXTURES / 'upernet.pth'))
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('size', ['div32', 'odd'])
def test_heads_match_mmseg_on_the_same_backbone_maps(model, size):
    case = load('heads.pt')[size]
    with torch.no_grad():
        decode = model.decode_head(case['maps'])
        aux = model.auxiliary_head(case['maps'][model.aux_index])
    assert decode.shape == case['decode'].shape and aux.shape == case['auxiliary'].shape
    assert relative_error(decode, case['decode']) < 1e-5
    assert relative_error(aux, case['auxiliary']) < 1e-5


# ---------------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def inference():
    return load('inference.pt')


def test_normalisation_is_mmsegs_data_preprocessor(inference):
    torch.testing.assert_close(normalize(inference['image'][None]), inference['normalized'],
                               rtol=0, atol=1e-5)


def test_whole_image_inference_matches_mmseg(model, inference):
    ref = inference['whole']
    image = inference['image'][None]
    with torch.no_grad():
        logits = model(normalize(image))[0]
    assert relative_error(logits, ref['logits']) < 1e-5
    probs = predict_probs(model, image, scale=TEST['scale'], mode='whole')[0]
    assert (probs - ref['logits'].softmax(0)).abs().max() < 1e-5
    assert torch.equal(probs.argmax(0), ref['pred'])


def test_sliding_window_inference_matches_mmseg(model, inference):
    ref = inference['slide']
    image = inference['image'][None]
    with torch.no_grad():
        logits = slide_logits(model, normalize(image), model.num_classes, TEST['crop'], TEST['stride'])[0]
    assert relative_error(logits, ref['logits']) < 1e-5
    probs = predict_probs(model, image, scale=TEST['scale'], mode='slide', crop=TEST['crop'],
                          stride=TEST['stride'])[0]
    assert (probs - ref['logits'].softmax(0)).abs().max() < 1e-5
    assert torch.equal(probs.argmax(0), ref['pred'])
    # the windows overlap: sliding is not the whole-image pass
    assert (ref['logits'] - inference['whole']['logits']).abs().max() > 0.1


class Recording(nn.Module):
    """The model, noting the size of every input it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []
        self.num_classes = model.num_classes

    def forward(self, x):
        self.sizes.append(list(x.shape[-2:]))
        return self.model(x)


def test_multiscale_flip_test_matches_mmseg(model, inference):
    ref = inference['aug']
    recording = Recording(model)
    probs = predict_probs(recording, inference['image'][None], scale=TEST['scale'],
                          ratios=TEST['aug_ratios'], flip=True)[0]
    # the same passes: each scale's size (truncated bound, rounded rescale), plain and flipped
    assert recording.sizes == [size for size, _ in ref['passes']]
    # mmseg resizes the uint8 image with OpenCV, we resize the float image: the inputs of the other
    # scales differ by up to one grey level, the probabilities by a few thousandths at most
    error = (probs - ref['probs']).abs()
    assert error.max() < 0.01 and error.mean() < 5e-4
    # and the argmax differs only at near-ties of mmseg's probabilities
    top2 = ref['probs'].topk(2, dim=0).values
    differ = probs.argmax(0) != ref['pred']
    assert differ.float().mean() < 0.01 and ((top2[0] - top2[1])[differ] <= 2 * error.max()).all()
    # the comparison is sharp enough to see the flipped passes un-flipped wrongly
    assert ((ref['probs'] - ref['probs'].flip(-1)).abs().mean() > 20 * error.mean())


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------

def test_training_losses_match_mmseg(model, config):
    ref = load('losses.pt')
    training = copy.deepcopy(model).train()  # batch statistics, dropout on
    torch.manual_seed(ref['seed'])
    losses = training(ref['inputs'], ref['labels'])
    assert (ref['labels'] == 255).any()
    # mmseg reports the auxiliary loss already weighted (loss_weight 0.4 in the release config)
    assert config.SEG.HEAD.AUX_WEIGHT == 0.4
    assert losses['loss_decode'].item() == pytest.approx(ref['loss_decode'].item(), rel=1e-5)
    assert (config.SEG.HEAD.AUX_WEIGHT * losses['loss_aux']).item() == pytest.approx(ref['loss_aux'].item(), rel=1e-5)
    assert losses['loss'].item() == pytest.approx((ref['loss_decode'] + ref['loss_aux']).item(), rel=1e-5)


def test_zero_label_reduction_matches_mmseg():
    ref = load('losses.pt')
    raw = ref['raw_label'].numpy()
    assert {0, 255} <= set(np.unique(raw).tolist())
    assert np.array_equal(reduce_zero_label(raw), ref['reduced_label'].numpy())


# ---------------------------------------------------------------------------------------------------
# Training transforms: the same outputs for the same draws, the same distribution of draws
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def transforms():
    return load('transforms.pt')


def rescale_at(ratio):
    rescale = RandomRescale(TRAIN['scale'], TRAIN['ratio_range'])
    rescale._ratio = lambda: ratio
    return rescale


def test_random_rescale_matches_mmseg_for_the_same_ratio(transforms):
    image, label = tv_tensors.Image(transforms['image']), tv_tensors.Mask(transforms['label'])
    for ratio, size in transforms['resize_sizes']:
        assert rescale_at(ratio).make_params([image])['size'] == size, ratio
    for (height, width), bound, size in transforms['rescale_bounds']:
        assert list(rescale_size(height, width, bound)) == size, (height, width, bound)
    for case in transforms['resize']:
        img, lab = rescale_at(case['ratio'])(image, label)
        assert img.shape == case['image'].shape and torch.equal(lab, case['label'])
        # OpenCV's and PyTorch's 8-bit bilinear resizing round differently: at most one level apart
        diff = (img.int() - case['image'].int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.2


def test_rescaled_sizes_are_distributed_as_mmsegs(transforms):
    torch.manual_seed(0)
    rescale = RandomRescale(TRAIN['scale'], TRAIN['ratio_range'])
    image = [tv_tensors.Image(transforms['image'])]
    ours = np.sort([rescale.make_params(image)['size'][0] for _ in range(len(transforms['resize_heights']))])
    theirs = np.sort(transforms['resize_heights'])
    grid = np.union1d(ours, theirs)
    ks = np.abs(np.searchsorted(ours, grid, 'right') / len(ours)
                - np.searchsorted(theirs, grid, 'right') / len(theirs)).max()
    assert ks < 0.07  # two samples of 2000 from one distribution: above 0.062 once in a thousand
    assert abs(ours.min() - theirs.min()) <= 1 and abs(ours.max() - theirs.max()) <= 1


def test_crop_keeps_the_crop_mmseg_keeps_for_the_same_draws(transforms):
    image, label = tv_tensors.Image(transforms['image']), tv_tensors.Mask(transforms['label'])
    crop = CatMaxRatioCrop(TRAIN['crop'], TRAIN['cat_max_ratio'])
    redrawn = 0
    for case in transforms['crop']:
        offsets = iter(case['offsets'])
        crop._draw = lambda height, width: next(offsets)
        params = crop.make_params([image, label])
        assert (params['top'], params['left']) == tuple(case['kept']), case
        redrawn += tuple(case['kept']) != tuple(case['offsets'][0])
    assert 0.2 * len(transforms['crop']) < redrawn < len(transforms['crop'])
    # and the crop itself, for the first case
    offsets = iter(transforms['crop'][0]['offsets'])
    crop._draw = lambda height, width: next(offsets)
    img, lab = crop(image, label)
    assert torch.equal(img, transforms['crop_output']['image'])
    assert torch.equal(lab, transforms['crop_output']['label'])


def test_crop_rule_at_its_edges_matches_mmseg(transforms):
    # 4 x 4 crops of a 4 x 40 map: crops exactly at the ratio, ignored pixels beside one class, and
    # draws of which none qualifies (the last is kept)
    edges = transforms['crop_edges']
    crop = CatMaxRatioCrop(4, TRAIN['cat_max_ratio'])
    inputs = [tv_tensors.Image(torch.zeros(3, 4, 40)), tv_tensors.Mask(edges['label'])]
    kept_last = 0
    for case in edges['cases']:
        offsets = iter(case['offsets'])
        crop._draw = lambda height, width: next(offsets)
        params = crop.make_params(inputs)
        assert (params['top'], params['left']) == tuple(case['kept']), case
        kept_last += tuple(case['kept']) == tuple(case['offsets'][-1])
    assert kept_last > 0.2 * len(edges['cases'])


def test_flip_matches_mmseg(transforms):
    ref = transforms['flip']
    steps = build_train_transform(scale=TRAIN['scale'], ratio_range=TRAIN['ratio_range'],
                                  crop_size=TRAIN['crop'], cat_max_ratio=TRAIN['cat_max_ratio'],
                                  flip=0.5, photometric=True).transforms
    flip = next(s for s in steps if isinstance(s, v2.RandomHorizontalFlip))
    img, lab = v2.RandomHorizontalFlip(1.0)(tv_tensors.Image(transforms['image']),
                                            tv_tensors.Mask(transforms['label']))
    assert torch.equal(img, ref['image']) and torch.equal(lab, ref['label'])
    torch.manual_seed(0)
    pixel = tv_tensors.Image(torch.arange(2, dtype=torch.uint8).view(1, 1, 2))
    rate = np.mean([flip(pixel)[0, 0, 0].item() == 1 for _ in range(ref['n'])])
    assert abs(rate - ref['rate']) < 4 * np.sqrt(0.5 / ref['n'])


def test_photometric_distortion_matches_mmseg_for_the_same_draws(transforms):
    image = tv_tensors.Image(transforms['photometric_image'])
    distort = PhotoMetricDistortion()
    exact = 0
    for case in transforms['photometric']:
        params = case['params']
        ours = distort.transform(image, params).as_subclass(torch.Tensor)
        diff = (ours.int() - case['image'].int()).abs()
        if params['saturation'] is None and params['hue'] is None:
            # brightness and contrast alone: float32 arithmetic and truncation, bit for bit
            assert diff.max() == 0, params
            exact += 1
        else:
            # OpenCV converts through 8-bit HSV (hue in 2-degree steps); we convert in floats
            assert diff.max() <= 6 and diff.float().mean() < 1.0, params
    assert 0 < exact < len(transforms['photometric'])


def test_photometric_draws_are_distributed_as_mmsegs(transforms):
    theirs = transforms['photometric_draws']
    distort = PhotoMetricDistortion()
    torch.manual_seed(0)
    ours = [distort.make_params([]) for _ in range(len(theirs))]
    n = len(theirs)
    for key in ('brightness', 'contrast', 'saturation', 'hue'):
        p_ours = np.mean([d[key] is not None for d in ours])
        p_theirs = np.mean([d[key] is not None for d in theirs])
        assert abs(p_ours - p_theirs) < 4 * np.sqrt(0.5 / n), key
        a = np.array([d[key] for d in ours if d[key] is not None])
        b = np.array([d[key] for d in theirs if d[key] is not None])
        spread = b.max() - b.min()
        assert abs(a.mean() - b.mean()) < 4 * b.std() * np.sqrt(2 / len(b)), key
        assert abs(a.min() - b.min()) < 0.01 * spread and abs(a.max() - b.max()) < 0.01 * spread, key
    assert abs(np.mean([d['contrast_first'] for d in ours]) - np.mean([d['contrast_first'] for d in theirs])) \
        < 4 * np.sqrt(0.5 / n)
    # the hue shift is an integer; both draw the same set of them
    assert set(d['hue'] for d in ours if d['hue'] is not None) == set(d['hue'] for d in theirs if d['hue'] is not None)
