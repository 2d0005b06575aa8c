"""What mmsegmentation itself computes for a small UPerNet, written as the fixtures under
tests/fixtures/mmseg/ (see tests/mmref/make_mmseg_fixtures.py, which runs this in the reference
environment; everything here needs mmsegmentation).

The model is the released configuration's (UPerNet: pyramid pooling 1, 2, 3, 6, FPN, bottleneck;
auxiliary FCN head on stage 3; cross-entropy ignoring 255, weights 1 and 0.4), built by
mmsegmentation at small widths with random weights, batch-norm statistics included. Its backbone is
this codebase's FocalNetDense registered with mmsegmentation (tests/test_dense_backbone.py checks it
against the official dense backbone); the heads, the segmentor, the data pipeline and the test-time
code are mmsegmentation's own.
"""
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tests' / 'mmref'))  # the name ``tests`` may be taken in site-packages

import shim  # noqa: E402

shim.install()

import cv2  # noqa: E402
import mmcv  # noqa: E402
import mmengine  # noqa: E402
import mmseg  # noqa: E402
from mmcv.transforms import RandomFlip, RandomResize, Resize  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.dataset import Compose  # noqa: E402
from mmseg.apis import inference_model  # noqa: E402
from mmseg.datasets.transforms import LoadAnnotations, PhotoMetricDistortion, RandomCrop  # noqa: E402
from mmseg.datasets.transforms import transforms as mmseg_transforms  # noqa: E402
from mmseg.models import SegTTAModel  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402

from models.dense import FocalNetDense  # noqa: E402

# Small widths, the released structure. Our config keys for the same model are in meta.json.
EMBED_DIM, DEPTHS, FOCAL_WINDOWS, NUM_CLASSES = 16, [1, 1, 1, 1], [3, 3, 3, 3], 5
CHANNELS, AUX_CHANNELS = 32, 16
# Test settings: the photo is 101 x 150, so a (1024, 101) bound keeps it at ratio 1 and truncation
# matters at the other ratios (101 x 0.75 = 75.75).
TEST_SCALE, CROP, STRIDE = (1024, 101), 64, 43
AUG_RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
# Training transforms.
TRAIN_SCALE, RATIO_RANGE, TRAIN_CROP, CAT_MAX_RATIO = (400, 100), (0.5, 2.0), 48, 0.75
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


@MODELS.register_module()
class FocalNetDenseBackbone(FocalNetDense):
    """FocalNetDense as an mmsegmentation backbone (the registry passes init_cfg)."""

    def __init__(self, init_cfg=None, **kwargs):
        super().__init__(**kwargs)

    def init_weights(self):
        pass


def model_config(test_cfg):
    norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN in the release; the same on one process
    widths = [EMBED_DIM * 2 ** i for i in range(4)]
    return dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', mean=MEAN, std=STD, bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=255, size=(TRAIN_CROP, TRAIN_CROP)),
        backbone=dict(type='FocalNetDenseBackbone', embed_dim=EMBED_DIM, depths=DEPTHS,
                      focal_levels=[2, 2, 2, 2], focal_windows=FOCAL_WINDOWS, drop_path_rate=0.0,
                      out_indices=(0, 1, 2, 3)),
        decode_head=dict(type='UPerHead', in_channels=widths, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                         channels=CHANNELS, dropout_ratio=0.1, num_classes=NUM_CLASSES, norm_cfg=norm_cfg,
                         align_corners=False,
                         loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
        auxiliary_head=dict(type='FCNHead', in_channels=widths[2], in_index=2, channels=AUX_CHANNELS,
                            num_convs=1, concat_input=False, dropout_ratio=0.1, num_classes=NUM_CLASSES,
                            norm_cfg=norm_cfg, align_corners=False,
                            loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
        train_cfg=dict(), test_cfg=test_cfg)


def randomise(model, generator):
    """Random weights everywhere; batch norms get random affine parameters and running statistics
    (so that eval-mode normalisation is exercised), classifiers a spread that makes argmax matter."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=generator))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=generator))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
                m.num_batches_tracked.fill_(1000)
            elif isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=generator))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))
            elif isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))


def build_model():
    cfg = Config(dict(model=model_config(dict(mode='whole')),
                      test_pipeline=[dict(type='LoadImageFromNDArray'),
                                     dict(type='Resize', scale=TEST_SCALE, keep_ratio=True),
                                     dict(type='PackSegInputs')]))
    torch.manual_seed(0)  # the backbone's own initialisation draws from the global generator
    model = MODELS.build(cfg.model)
    model.cfg = cfg
    randomise(model, torch.Generator().manual_seed(0))
    return balance_classes(model.eval())


def balance_classes(model):
    """Shift each classifier's biases so that every class has the same mean logit on the photo:
    random heads otherwise predict one or two classes everywhere, and the argmax would show little."""
    rgb = photo()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() - mean) / std
    with torch.no_grad():
        maps = model.backbone(x)
        for head in (model.decode_head, model.auxiliary_head):
            head.conv_seg.bias -= head(maps).mean(dim=(0, 2, 3))
    return model


def sample_photo(name):
    from sklearn.datasets import load_sample_images
    images = load_sample_images()
    return images.images[[Path(f).name for f in images.filenames].index(name)]


def photo():
    """A 101 x 150 RGB crop of scikit-learn's china.jpg (temple roof, trees and sky)."""
    return np.ascontiguousarray(sample_photo('china.jpg')[40:141, 250:400])


def colourful_photo():
    """A 60 x 80 crop of flower.jpg: saturated, bright petals, where the distortion's steps clip."""
    return np.ascontiguousarray(sample_photo('flower.jpg')[200:260, 350:430])


def label_of(rgb):
    """A label map for the photo, 1..5 by brightness band (as ADE20K files: 0 unlabelled), with an
    unlabelled stripe and an ignored (255) block, so crops are often dominated by one class."""
    grey = rgb.astype(np.float32).mean(axis=2)
    label = (1 + np.digitize(grey, [60, 100, 150, 200])).astype(np.uint8)
    label[:, 70:73] = 0
    label[80:, 120:] = 255
    return label


# ---------------------------------------------------------------------------------------------------


def heads_fixture(model):
    """Both heads on random backbone maps of the shapes a 128 x 160 and a 100 x 76 input give."""
    out, g = {}, torch.Generator().manual_seed(1)
    for name, size in (('div32', (128, 160)), ('odd', (100, 76))):
        with torch.no_grad():
            shapes = [f.shape for f in model.backbone(torch.zeros(1, 3, *size))]
            maps = [torch.randn((2,) + tuple(s[1:]), generator=g) for s in shapes]
            out[name] = {'input_size': list(size), 'maps': maps, 'decode': model.decode_head(maps),
                         'auxiliary': model.auxiliary_head(maps)}
    return out


def inference_fixture(model, rgb):
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    out = {'image': torch.from_numpy(rgb).permute(2, 0, 1).contiguous()}
    with torch.no_grad():
        # mmseg's data preprocessor on the raw image: the network's input
        data = model.data_preprocessor({'inputs': [torch.from_numpy(bgr).permute(2, 0, 1).contiguous()],
                                        'data_samples': [SegDataSample()]}, False)
        out['normalized'] = data['inputs']
        for mode, test_cfg in (('whole', dict(mode='whole')),
                               ('slide', dict(mode='slide', crop_size=(CROP, CROP), stride=(STRIDE, STRIDE)))):
            model.test_cfg = mmengine.ConfigDict(test_cfg)
            result = inference_model(model, bgr)
            out[mode] = {'logits': result.seg_logits.data, 'pred': result.pred_sem_seg.data[0]}
        out['aug'] = aug_test(model, bgr)
    model.test_cfg = mmengine.ConfigDict(mode='whole')
    return out


def aug_test(model, bgr):
    """The multi-scale + flip test through mmsegmentation's SegTTAModel. The bound of each pass is
    (long, short) x ratio, truncated, as the released models' multi-scale test (MultiScaleFlipAug with
    img_ratios); mmsegmentation 1.x's default ADE20K tta_pipeline scales the image itself instead."""
    model.test_cfg = mmengine.ConfigDict(mode='whole')
    pipeline = Compose([
        dict(type='LoadImageFromNDArray'),
        dict(type='TestTimeAug', transforms=[
            [dict(type='Resize', scale=(int(TEST_SCALE[0] * r), int(TEST_SCALE[1] * r)), keep_ratio=True)
             for r in AUG_RATIOS],
            [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')],
            [dict(type='PackSegInputs')]])])
    data = pipeline(dict(img=bgr))
    tta = SegTTAModel(module=model).eval()
    # mmengine's test loop collates a batch of one image: every augmentation's list has one entry
    batch = {'inputs': [[x] for x in data['inputs']], 'data_samples': [[s] for s in data['data_samples']]}
    passes = []
    for inputs, samples in zip(batch['inputs'], batch['data_samples']):
        passes.append((list(samples[0].img_shape), bool(samples[0].flip)))
    merged = tta.test_step(batch)[0]
    # the merged probabilities, recomputed from the passes as merge_preds averages them
    per_pass = [model.test_step({'inputs': i, 'data_samples': s})[0].seg_logits.data.softmax(0)
                for i, s in zip(batch['inputs'], batch['data_samples'])]
    return {'probs': torch.stack(per_pass).mean(0), 'pred': merged.pred_sem_seg.data.reshape(bgr.shape[:2]),
            'passes': passes}


def losses_fixture(model, rgb):
    """model.loss (the decode and auxiliary cross-entropies, ignore index 255, weights 1 and 0.4) on
    a batch of two crops, in training mode: batch statistics, dropout drawn after torch.manual_seed(0)."""
    label = torch.from_numpy(label_of(rgb)).long() - 1
    label[label < 0] = 255
    label[label == 254] = 255
    image = torch.from_numpy(rgb).permute(2, 0, 1).float()
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    crops = [(0, 0), (37, 86)]
    inputs = torch.stack([(image[:, y:y + 64, x:x + 64] - mean) / std for y, x in crops])
    labels = torch.stack([label[y:y + 64, x:x + 64] for y, x in crops]).to(torch.uint8)
    samples = []
    for lab in labels:
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=lab[None].long())
        samples.append(s)
    model.train()
    torch.manual_seed(0)
    losses = model.loss(inputs, samples)
    model.eval()
    # LoadAnnotations with reduce_zero_label on a label file with 0, 1..5 and 255
    raw = label_of(rgb)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'label.png')
        cv2.imwrite(path, raw)
        loaded = LoadAnnotations(reduce_zero_label=True)(
            dict(seg_map_path=path, reduce_zero_label=True, seg_fields=[]))['gt_seg_map']
    return {'inputs': inputs, 'labels': labels, 'seed': 0,
            'loss_decode': losses['decode.loss_ce'].detach(), 'loss_aux': losses['aux.loss_ce'].detach(),
            'raw_label': torch.from_numpy(raw), 'reduced_label': torch.from_numpy(loaded)}


# ---------------------------------------------------------------------------------------------------


class RecordingRandom:
    """numpy.random as PhotoMetricDistortion calls it, keeping (name, value) of every draw."""

    def __init__(self):
        self.draws = []

    def __getattr__(self, name):
        fn = getattr(np.random, name)

        def call(*args, **kwargs):
            value = fn(*args, **kwargs)
            self.draws.append((name, value.item() if hasattr(value, 'item') else value))
            return value
        return call


def photometric_params(draws):
    """The draws of one PhotoMetricDistortion call, as named parameters (mmseg's order: brightness
    coin [value], contrast mode, [contrast coin [value]], saturation coin [value], hue coin [shift],
    [contrast coin [value]])."""
    draws = iter(draws)

    def maybe():
        return next(draws)[1] if next(draws)[1] else None
    params = {'brightness': maybe()}
    mode = next(draws)[1]
    contrast = maybe() if mode == 1 else None
    params['saturation'] = maybe()
    params['hue'] = maybe()
    if mode == 0:
        contrast = maybe()
    params.update(contrast_first=mode == 1, contrast=contrast)
    assert next(draws, None) is None
    return params


def transforms_fixture(rgb):
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    label = label_of(rgb)
    reduced = label.astype(np.int16) - 1
    reduced[(label == 0) | (label == 255)] = 255
    reduced = reduced.astype(np.uint8)

    def results(img, seg):
        return dict(img=img.copy(), gt_seg_map=seg.copy(), seg_fields=['gt_seg_map'], img_shape=img.shape[:2],
                    ori_shape=img.shape[:2])

    out = {'image': torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), 'label': torch.from_numpy(reduced)}
    lo, hi = RATIO_RANGE

    # RandomResize: the ratio it draws (np.random.random_sample, replayed from the same seed), its output
    resize = RandomResize(scale=TRAIN_SCALE, ratio_range=RATIO_RANGE, keep_ratio=True)
    cases = []
    for seed in range(4):
        np.random.seed(seed)
        ratio = np.random.random_sample() * (hi - lo) + lo
        np.random.seed(seed)
        r = resize(results(bgr, reduced))
        cases.append({'ratio': float(ratio), 'image': torch.from_numpy(r['img'][..., ::-1].copy()).permute(2, 0, 1),
                      'label': torch.from_numpy(r['gt_seg_map'].copy())})
    out['resize'] = cases
    # and the fixed resizes with ratios where truncating the bound matters
    out['resize_sizes'] = []
    for ratio in (0.5, 0.61, 0.75, 0.99, 1.0, 1.33, 1.7, 2.0):
        bound = (int(TRAIN_SCALE[0] * ratio), int(TRAIN_SCALE[1] * ratio))
        r = Resize(scale=bound, keep_ratio=True)(results(bgr, reduced))
        out['resize_sizes'].append((ratio, list(r['img'].shape[:2])))

    # mmcv's keep-ratio rule on bounds where the long edge binds, the short one does, or both are
    # given (long, short) or (short, long), on the photo and on it turned upright
    out['rescale_bounds'] = []
    for bound in ((120, 100), (100, 120), (512, 64), (64, 512), (2048, 512), (160, 101), (149, 1000)):
        for img in (bgr, np.ascontiguousarray(bgr.transpose(1, 0, 2))):
            r = Resize(scale=bound, keep_ratio=True)(results(img, reduced if img is bgr else reduced.T.copy()))
            out['rescale_bounds'].append((list(img.shape[:2]), list(bound), list(r['img'].shape[:2])))

    # RandomCrop with cat_max_ratio: the offsets it may draw (replayed) and the one it keeps
    crop = RandomCrop(crop_size=(TRAIN_CROP, TRAIN_CROP), cat_max_ratio=CAT_MAX_RATIO)
    margin_h, margin_w = reduced.shape[0] - TRAIN_CROP, reduced.shape[1] - TRAIN_CROP
    crops = []
    for seed in range(300):
        np.random.seed(seed)
        offsets = [(int(np.random.randint(0, margin_h + 1)), int(np.random.randint(0, margin_w + 1)))
                   for _ in range(11)]
        np.random.seed(seed)
        y1, _, x1, _ = crop.crop_bbox(results(bgr, reduced))
        crops.append({'offsets': offsets, 'kept': (int(y1), int(x1))})
    out['crop'] = crops
    # and on a label map made for the rule's edges: 4 x 4 crops of a 4 x 40 map, mostly class 0, where
    # a crop is balanced only across the two-column band, exactly at the ratio across a one-column
    # band, and often none of eleven draws qualifies (then the last is kept)
    edges = np.zeros((4, 40), np.uint8)
    edges[:, 10:12] = 1
    edges[:, 20] = 2
    edges[:, 30:32] = 255
    edges[:2, 33] = 3
    small = RandomCrop(crop_size=(4, 4), cat_max_ratio=CAT_MAX_RATIO)
    cases = []
    for seed in range(300):
        np.random.seed(seed)
        offsets = [(int(np.random.randint(0, 1)), int(np.random.randint(0, 37))) for _ in range(11)]
        np.random.seed(seed)
        y1, _, x1, _ = small.crop_bbox(results(np.zeros((4, 40, 3), np.uint8), edges))
        cases.append({'offsets': offsets, 'kept': (int(y1), int(x1))})
    out['crop_edges'] = {'label': torch.from_numpy(edges), 'cases': cases}
    np.random.seed(0)
    r = crop(results(bgr, reduced))
    out['crop_output'] = {'image': torch.from_numpy(r['img'][..., ::-1].copy()).permute(2, 0, 1),
                          'label': torch.from_numpy(r['gt_seg_map'].copy())}

    # RandomFlip
    np.random.seed(0)
    flip = RandomFlip(prob=0.5)
    flips = [bool(flip(results(bgr[:2, :2], reduced[:2, :2]))['flip']) for _ in range(2000)]
    r = RandomFlip(prob=1.0)(results(bgr, reduced))
    out['flip'] = {'rate': float(np.mean(flips)), 'n': len(flips),
                   'image': torch.from_numpy(r['img'][..., ::-1].copy()).permute(2, 0, 1),
                   'label': torch.from_numpy(r['gt_seg_map'].copy())}

    # PhotoMetricDistortion: outputs for recorded draws, and the draws' distribution
    recorder = RecordingRandom()
    saved = mmseg_transforms.random
    mmseg_transforms.random = recorder
    try:
        distort = PhotoMetricDistortion()
        colourful = colourful_photo()
        out['photometric_image'] = torch.from_numpy(colourful).permute(2, 0, 1).contiguous()
        part = np.ascontiguousarray(colourful[..., ::-1])
        cases = []
        for seed in range(32):
            np.random.seed(seed)
            recorder.draws = []
            img = distort(dict(img=part.copy()))['img']
            cases.append({'params': photometric_params(recorder.draws),
                          'image': torch.from_numpy(img[..., ::-1].copy()).permute(2, 0, 1)})
        out['photometric'] = cases
        np.random.seed(1)
        tiny = bgr[:4, :4].copy()
        draws = []
        for _ in range(4000):
            recorder.draws = []
            distort(dict(img=tiny.copy()))
            draws.append(photometric_params(recorder.draws))
        out['photometric_draws'] = draws
    finally:
        mmseg_transforms.random = saved

    # The distributions over many draws of what cannot be replayed draw for draw: the rescaled
    # height, and how often the kept crop is a balanced one.
    np.random.seed(2)
    heights = [resize(results(bgr[:, :, :1], reduced))['img'].shape[0] for _ in range(2000)]
    out['resize_heights'] = heights
    return out


def write(out: Path):
    """Write every fixture file into ``out`` and list them."""
    register_all_modules()
    out.mkdir(parents=True, exist_ok=True)
    model = build_model()
    rgb = photo()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({'meta': {'mmseg_version': mmseg.__version__, 'note': 'random weights'}, 'state_dict': state},
               out / 'upernet.pth')
    torch.save(heads_fixture(model), out / 'heads.pt')
    torch.save(inference_fixture(model, rgb), out / 'inference.pt')
    torch.save(losses_fixture(model, rgb), out / 'losses.pt')
    torch.save(transforms_fixture(rgb), out / 'transforms.pt')
    meta = {
        'generator': 'tests/mmref/make_mmseg_fixtures.py',
        'versions': {'mmsegmentation': mmseg.__version__, 'mmcv': mmcv.__version__, 'mmengine': mmengine.__version__,
                     'torch': torch.__version__, 'numpy': np.__version__, 'opencv': cv2.__version__,
                     'python': platform.python_version()},
        'model_opts': ['MODEL.FOCAL.EMBED_DIM', str(EMBED_DIM), 'MODEL.FOCAL.DEPTHS', str(DEPTHS),
                       'MODEL.FOCAL.FOCAL_WINDOWS', str(FOCAL_WINDOWS), 'MODEL.NUM_CLASSES', str(NUM_CLASSES),
                       'MODEL.DROP_PATH_RATE', '0.0', 'SEG.HEAD.CHANNELS', str(CHANNELS),
                       'SEG.HEAD.AUX_CHANNELS', str(AUX_CHANNELS)],
        'test': {'scale': list(TEST_SCALE), 'crop': CROP, 'stride': STRIDE, 'aug_ratios': AUG_RATIOS},
        'train': {'scale': list(TRAIN_SCALE), 'ratio_range': list(RATIO_RANGE), 'crop': TRAIN_CROP,
                  'cat_max_ratio': CAT_MAX_RATIO},
    }
    (out / 'meta.json').write_text(json.dumps(meta, indent=1) + '\n')
    for f in sorted(out.iterdir()):
        print(f'{f}  {f.stat().st_size / 1e3:.0f} kB')

