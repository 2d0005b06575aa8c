"""RandAugment ops left to the training device (data/device_augment.py): each computes Pillow's pixels
on real photos, and the fast path that leaves them there gives the same images, from the same draws,
as the one that applies them in the loader worker; likewise for JPEG decoding left to the device
(DATA.GPU_DECODE), checked here with the CPU as the device."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment

import config as cfg
from data import build_train_transform
from data import device_augment as dev
from data.fast_transform import RawBatch
from data.robust import RobustImageFolder, collate_with_problems
from data.sampler import ResumableSampler, SeededSamples
from data.transforms import release_posterize
from photos import random_crop, sample_photos

RECIPE = cfg.load_config(None, [])
FILL = (124, 116, 104)  # the recipe's fill colour, ImageNet's mean


def _photo(seed: int, sizes=(150, 300)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return random_crop(rng, sample_photos()[seed % 2][1], sizes)


def _pixels(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img))


@pytest.mark.parametrize('name,value', [('ShearX', 0.27), ('ShearY', -0.21), ('TranslateXRel', 0.41),
                                        ('TranslateYRel', -0.377), ('TranslateX', 33.3), ('TranslateY', -7.5),
                                        ('Rotate', 27.3), ('Rotate', -13.1), ('Rotate', 400.0)])
@pytest.mark.parametrize('resample', [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
def test_geometric_ops_give_pillows_pixels(name, value, resample, one_thread):
    for seed, size in ((0, (224, 224)), (1, (160, 200))):
        img = _photo(seed).resize(size, Image.Resampling.BICUBIC)
        reference = auto_augment.NAME_TO_OP[name](img, value, fillcolor=FILL, resample=resample)
        affine = dev.Affine(dev._MATRICES[name](value, *img.size), resample == Image.Resampling.BICUBIC, FILL)
        assert torch.equal(dev.pillow_affine(_pixels(img), affine), _pixels(reference))


def test_right_angle_rotations_stay_with_pillow():
    assert all(dev._rotation(a, 224, 224) is None for a in (0.0, 90.0, -90.0, 180.0, 360.0))
    assert dev._rotation(0.5, 224, 224) is not None


def _lookup_table_cases():
    grey_levels = Image.fromarray(np.array([[10, 10, 200]] * 3, dtype=np.uint8)).convert('RGB')
    flat = Image.new('RGB', (17, 9), (90, 90, 90))
    images = [_photo(s) for s in range(4)] + [grey_levels, flat]
    ops = [('AutoContrast', ImageOps.autocontrast, ()), ('Equalize', ImageOps.equalize, ()),
           ('Invert', ImageOps.invert, ())]
    ops += [('SolarizeIncreasing', ImageOps.solarize, (t,)) for t in (0, 77, 128, 256)]
    ops += [('SolarizeAdd', auto_augment.solarize_add, (a,)) for a in (0, 50, 110)]
    ops += [('PosterizeIncreasing', release_posterize, (b,)) for b in (-1, 0, 2, 4, 8)]
    ops += [(name, auto_augment.NAME_TO_OP[name], (f,)) for f in (0.1, 0.37, 1.0, 1.3, 1.9)
            for name in ('ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing')]
    return [(name, fn, args, img) for name, fn, args in ops for img in images]


def test_colour_ops_give_pillows_pixels():
    """Lookup-table, histogram and enhance ops (Pillow's ImageOps and ImageEnhance)."""
    for name, fn, args, img in _lookup_table_cases():
        ours = dev.apply_on_device(_pixels(img), [dev.DeviceOp(name, args)])
        assert torch.equal(ours, _pixels(fn(img, *args))), (name, args, img.size)


def _seeded(seed: int, fn):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return fn()


def _encode(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, 'JPEG', quality=90)
    return out.getvalue()


def _same_draws_same_image(in_worker, other, seed: int):
    """Both transforms on one photo from ``seed``: they leave the random generators in the same
    state and give the same finished image. Returns both RawImages."""
    data = _encode(_photo(seed, (250, 500)))
    a = _seeded(seed, lambda: in_worker(data, 'x'))
    state_a = random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()
    b = _seeded(seed, lambda: other(data, 'x'))
    state_b = random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()
    assert state_a[0] == state_b[0] and state_a[1] == state_b[1] and torch.equal(state_a[2], state_b[2])
    assert torch.equal(RawBatch.collate([a]).to('cpu'), RawBatch.collate([b]).to('cpu'))
    return a, b


def test_ops_left_to_the_device_give_the_same_images_from_the_same_draws(monkeypatch, one_thread):
    in_worker = build_train_transform(RECIPE, device_augment=False)
    on_device = build_train_transform(RECIPE, device_augment=True)
    left = []
    for seed in range(60):
        a, b = _same_draws_same_image(in_worker, on_device, seed)
        assert a.ops == []
        left.extend(op.name for op in b.ops)
    geometric = [n for n in left if n in dev._MATRICES]
    enhance = [n for n in left if n.startswith(('Color', 'Contrast', 'Brightness', 'Sharpness'))]
    assert len(geometric) >= 5 and len(enhance) >= 5 and dev.FLIP in left  # every kind went


def test_an_op_the_device_cannot_do_applies_the_recorded_ones_first_in_the_worker(one_thread):
    """A RandAugment op whose function is not timm's own (so not known to the device) gets the
    image with the ops recorded before it applied, with Pillow, in order."""
    img = _photo(3).resize((120, 100))
    custom = lambda image, factor, **_: image.point(lambda v: int(v * factor) % 256)  # noqa: E731
    recipe = [auto_augment.AugmentOp('Rotate', prob=1.0, magnitude=9, hparams={'img_mean': FILL}),
              auto_augment.AugmentOp('ColorIncreasing', prob=1.0, magnitude=9),
              auto_augment.AugmentOp('Sharpness', prob=1.0, magnitude=9)]
    recipe[1].aug_fn = custom
    # The three ops in this order, each called as RandAugment calls it.
    staged = dev.StagedRandAugment(auto_augment.RandAugment(recipe, num_layers=3))
    reference, out = img, dev.Staged(img)
    for seed, (ref_op, op) in enumerate(zip(recipe, staged.randaugment.ops)):
        reference = _seeded(seed, lambda: ref_op(reference))
        out = _seeded(seed, lambda: op(out))
    assert [o.name for o, _ in out.pending] == ['Sharpness']  # Rotate was applied in the worker
    finished = dev.apply_on_device(_pixels(out.image), [o for o, _ in out.pending])
    assert torch.equal(finished, _pixels(reference))


def test_ops_left_to_the_device_cross_loader_worker_processes(photo_folder, one_thread):
    root = photo_folder(24) / 'train'
    batches = {}
    for on_device in (False, True, 'decode'):
        transform = _gpu_decode_transform() if on_device == 'decode' else \
            build_train_transform(RECIPE, device_augment=on_device)
        dataset = RobustImageFolder(str(root), transform)
        sampler = ResumableSampler(dataset, num_replicas=1, rank=0, seed=3)
        loader = torch.utils.data.DataLoader(SeededSamples(dataset), batch_size=8, sampler=sampler, num_workers=2,
                                             collate_fn=collate_with_problems)
        batches[on_device] = [(b, b.to('cpu')) for b, _, _ in loader]
    assert sum(len(ops) > 0 for b, _ in batches[True] for ops in b.ops) >= 4
    assert sum(e is not None for b, _ in batches['decode'] for e in b.encoded) >= 4
    for (_, a), (_, b), (_, c) in zip(batches[False], batches[True], batches['decode']):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (benchmarks/gpu_check.sh runs it)')
def test_ops_on_a_gpu_give_the_cpus_pixels():
    for name, fn, args, img in _lookup_table_cases():
        op = [dev.DeviceOp(name, args)]
        assert torch.equal(dev.apply_on_device(_pixels(img).cuda(), op).cpu(), dev.apply_on_device(_pixels(img), op))
    img = _photo(0).resize((224, 224))
    for name in dev._MATRICES:
        affine = dev.Affine(dev._MATRICES[name](0.3 if 'Rotate' not in name else 21.0, 224, 224), True, FILL)
        on_gpu = dev.pillow_affine(_pixels(img).cuda(), affine).cpu()
        assert torch.equal(on_gpu, dev.pillow_affine(_pixels(img), affine))


def _gpu_decode_transform():
    """The fast path as DATA.GPU_DECODE builds it, whose device here is the CPU."""
    from data.fast_transform import fast_train_transform
    from data.transforms import build_transform
    return fast_train_transform(build_transform(True, RECIPE), gpu_decode=True)


def test_decoding_left_to_the_device_gives_the_worker_paths_images(one_thread):
    """The GPU decode path with the CPU as its device (libjpeg-turbo on both sides): the same images
    and draws as the path that decodes in the worker; the flip and RandAugment wait with it."""
    in_worker = build_train_transform(RECIPE, device_augment=False)
    on_device = _gpu_decode_transform()
    assert on_device.gpu_decode
    left_encoded = 0
    for seed in range(40):
        _, b = _same_draws_same_image(in_worker, on_device, seed)
        left_encoded += b.encoded is not None
        assert (b.pixels is None) == (b.encoded is not None)
    assert left_encoded >= 30  # nearly all: every RandAugment op can wait for the device


def test_files_the_device_cannot_decode_are_decoded_in_the_worker_or_named(one_thread):
    on_device = _gpu_decode_transform()
    photo = _photo(4, (250, 400))
    png, cmyk = io.BytesIO(), io.BytesIO()
    photo.save(png, 'PNG')
    photo.convert('CMYK').save(cmyk, 'JPEG')
    for data in (png.getvalue(), cmyk.getvalue()):
        assert _seeded(0, lambda: on_device(data, 'x')).encoded is None
    data = _encode(photo)
    truncated = data[:len(data) // 3]
    seed = next(s for s in range(50) if _seeded(s, lambda: on_device(truncated, 'bad.jpg')).encoded is not None)
    raw = _seeded(seed, lambda: on_device(truncated, 'bad.jpg'))
    good = _seeded(seed, lambda: on_device(data, 'good.jpg'))
    from data.robust import CorruptImageError
    with pytest.raises(CorruptImageError, match='bad.jpg'):
        RawBatch.collate([good, raw]).to('cpu')


def test_gpu_decode_without_a_gpu_is_a_one_line_error():
    from errors import UserError
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    with pytest.raises(UserError, match='DATA.GPU_DECODE'):
        build_train_transform(cfg.load_config(None, ['DATA.GPU_DECODE', 'True']))


def test_a_batch_of_geometric_ops_with_both_filters_gives_pillows_pixels(one_thread):
    images = [_photo(s).resize((96, 80), Image.Resampling.BICUBIC) for s in range(4)]
    cases = [('Rotate', 17.0, Image.Resampling.BICUBIC), ('ShearX', -0.2, Image.Resampling.BILINEAR),
             ('TranslateYRel', 0.3, Image.Resampling.BILINEAR), ('ShearY', 0.25, Image.Resampling.BICUBIC)]
    fills = [FILL, (0, 0, 0), (255, 10, 3), FILL]
    affines = [dev.Affine(dev._MATRICES[name](v, 96, 80), r == Image.Resampling.BICUBIC, f)
               for (name, v, r), f in zip(cases, fills)]
    batch = dev.pillow_affine_batch(torch.stack([_pixels(img) for img in images]), affines)
    for img, (name, value, resample), fill, ours in zip(images, cases, fills, batch):
        assert torch.equal(ours, _pixels(auto_augment.NAME_TO_OP[name](img, value, fillcolor=fill, resample=resample)))


def test_the_transforms_pickle_for_spawned_loader_workers():
    import pickle
    from data.fast_transform import FastTrainTransform
    for transform in (build_train_transform(RECIPE, device_augment=True), _gpu_decode_transform()):
        copy = pickle.loads(pickle.dumps(transform))
        assert isinstance(copy, FastTrainTransform)
        data = _encode(_photo(5, (250, 500)))
        a, b = _seeded(2, lambda: transform(data, 'x')), _seeded(2, lambda: copy(data, 'x'))
        assert torch.equal(RawBatch.collate([a]).to('cpu'), RawBatch.collate([b]).to('cpu'))


def test_a_batch_of_colour_ops_with_their_own_arguments_gives_pillows_pixels(one_thread):
    """Images of a batch with the same op and different arguments, and different ops, in turns."""
    images = [_photo(s).resize((64, 48)) for s in range(4)]
    cases = [[('SolarizeAdd', auto_augment.solarize_add, (30,)), ('ContrastIncreasing', auto_augment.contrast, (1.6,))],
             [('SolarizeAdd', auto_augment.solarize_add, (90,)), ('Equalize', auto_augment.equalize, ())],
             [('PosterizeIncreasing', release_posterize, (2,)), ('ContrastIncreasing', auto_augment.contrast, (0.3,))],
             [('PosterizeIncreasing', release_posterize, (5,))]]
    batch = torch.stack([_pixels(img) for img in images])
    out = dev.apply_to_batch(batch, [[dev.DeviceOp(name, args) for name, _, args in ops] for ops in cases])
    for img, ops, ours in zip(images, cases, out):
        for _, fn, args in ops:
            img = fn(img, *args)
        assert torch.equal(ours, _pixels(img))


def test_flips_first_or_between_ops_keep_every_images_order(one_thread):
    """The leading flips of a batch are done together before the ops' turns; a flip elsewhere in an
    image's list stays in its place, and images without one are not moved."""
    def flip(img):
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    images = [_photo(s).resize((64, 48)) for s in range(4)]
    cases = [[(dev.FLIP, flip, ()), ('ShearX', auto_augment.shear_x, (0.2,))],
             [('ShearX', auto_augment.shear_x, (0.2,)), (dev.FLIP, flip, ()), ('Invert', auto_augment.invert, ())],
             [(dev.FLIP, flip, ())],
             [('Equalize', auto_augment.equalize, ()), ('ShearX', auto_augment.shear_x, (-0.1,))]]
    ops = [[dev.DeviceOp(name, args, dev.Affine(dev._MATRICES[name](*args, 64, 48), True, (0, 0, 0))
                         if name in dev._MATRICES else None) for name, _, args in case] for case in cases]
    out = dev.apply_to_batch(torch.stack([_pixels(img) for img in images]), ops)
    for img, case, ours in zip(images, cases, out):
        for name, fn, args in case:
            img = fn(img, *args, fillcolor=(0, 0, 0), resample=Image.Resampling.BICUBIC) \
                if name in dev._MATRICES else fn(img, *args)
        assert torch.equal(ours, _pixels(img))


def test_augment_on_chooses_where_the_ops_run(monkeypatch):
    """DATA.AUGMENT_ON auto leaves RandAugment to a GPU when there is one; worker keeps it in the loader
    workers even then; any other value, and GPU decoding with ops kept in the workers, is one line."""
    from data.device_augment import StagedRandAugment
    from errors import UserError
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    on_gpu = build_train_transform(cfg.load_config(None, ['DATA.AUGMENT_ON', 'auto']))
    in_worker = build_train_transform(cfg.load_config(None, ['DATA.AUGMENT_ON', 'worker']))
    assert isinstance(on_gpu.pil_steps[-1], StagedRandAugment)
    assert type(in_worker.pil_steps[-1]).__name__ == 'RandAugment' and not in_worker.all_staged
    with pytest.raises(UserError, match="^DATA.AUGMENT_ON must be one of auto, worker; got 'gpu'$"):
        build_train_transform(cfg.load_config(None, ['DATA.AUGMENT_ON', 'gpu']))
    with pytest.raises(UserError, match="cannot go with DATA.AUGMENT_ON 'worker'"):
        build_train_transform(cfg.load_config(None, ['DATA.AUGMENT_ON', 'worker', 'DATA.GPU_DECODE', 'True']))
