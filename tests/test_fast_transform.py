"""The fast training input path (data/fast_transform.py) against the release recipe's timm transform:
the same random draws, the same pixels up to resampling, the same handling of odd and damaged files,
and the loader and main.py using it by default."""
import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import functional as TF

import config as cfg
from data import build_loader, build_train_transform, build_transform
from data import device_augment
from data import fast_transform as fast_module
from data.fast_transform import FastTrainTransform, RawBatch, RawImage, _reduction
from data.robust import CorruptImageError, RobustImageFolder, decode_image
from photos import random_crop, sample_photos

RECIPE = cfg.load_config(None, [])  # the release recipe: rand-m9-mstd0.5-inc1, erasing 0.25 'pixel'


def _photo(seed: int, sizes=(250, 500)) -> Image.Image:
    rng = np.random.RandomState(seed)
    _, pixels = sample_photos()[seed % 2]
    return random_crop(rng, pixels, sizes)


def _encode(img: Image.Image, fmt: str = 'JPEG', **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def _seeded(seed: int, fn):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return fn()


def _both(data: bytes, seed: int, config=RECIPE):
    """(reference output, fast output finished on the CPU) of one encoded image, from the same seed,
    and whether every generator ended in the same state."""
    reference, fast = build_transform(True, config), build_train_transform(config)
    assert isinstance(fast, FastTrainTransform)
    ref = _seeded(seed, lambda: reference(decode_image(io.BytesIO(data), 'x')))
    ref_states = random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()
    raw = _seeded(seed, lambda: fast(data, 'x'))
    states = random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()
    # The erasing noise is drawn later, from the saved torch state (RawBatch.to), so torch's own
    # generator only matches where nothing was erased.
    same_state = ref_states[0] == states[0] and ref_states[1] == states[1] and \
        (raw.erasures is not None or torch.equal(ref_states[2], states[2]))
    return ref, RawBatch.collate([raw]).to('cpu')[0], raw, same_state


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in 8-bit grey levels of two normalised images."""
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    mse = float((((a - b) * std * 255) ** 2).mean())
    return float('inf') if mse == 0 else 10 * np.log10(255 ** 2 / mse)


class Recorder:
    """Records the draws of both paths: crop boxes, flips, RandAugment ops with their arguments."""

    def __init__(self, monkeypatch):
        self.events = []
        get_params = RandomResizedCropAndInterpolation.get_params

        def crop(img, scale, ratio):
            box = get_params(img, scale, ratio)
            self.events.append(('crop', box))
            return box
        monkeypatch.setattr(RandomResizedCropAndInterpolation, 'get_params', staticmethod(crop))
        hflip = TF.hflip

        def flip(img):
            self.events.append(('flip',))
            return hflip(img)
        monkeypatch.setattr(TF, 'hflip', flip)
        # A flip left for the device is drawn, and recorded, when the fast path stages it.
        add = device_augment.Staged.add

        def staged_add(staged, op, apply):
            if op.name == device_augment.FLIP:
                self.events.append(('flip',))
            return add(staged, op, apply)
        monkeypatch.setattr(device_augment.Staged, 'add', staged_add)
        call = auto_augment.AugmentOp.__call__

        def op(self_op, img):
            original = self_op.aug_fn

            def recorded(img, *args, **kwargs):
                self.events.append(('op', self_op.name, args))
                return original(img, *args, **kwargs)
            self_op.aug_fn = recorded
            try:
                return call(self_op, img)
            finally:
                self_op.aug_fn = original
        monkeypatch.setattr(auto_augment.AugmentOp, '__call__', op)

    def take(self):
        events, self.events = self.events, []
        return events


@pytest.mark.parametrize('device_augment', [False, True], ids=['ops_in_worker', 'ops_on_device'])
def test_same_draws_crop_flip_ops_and_erasing_as_the_reference(device_augment, monkeypatch, one_thread):
    recorder = Recorder(monkeypatch)
    ops = flips = erased = 0
    for seed in range(40):
        data = _encode(_photo(seed), quality=90)
        reference = build_transform(True, RECIPE)
        fast = build_train_transform(RECIPE, device_augment=device_augment)
        ref = _seeded(seed, lambda: reference(decode_image(io.BytesIO(data), 'x')))
        ref_events = recorder.take()
        raw = _seeded(seed, lambda: fast(data, 'x'))
        assert recorder.take() == ref_events
        ops += sum(e[0] == 'op' for e in ref_events)
        flips += ('flip',) in ref_events
        # The same boxes erased with the same noise: those pixels are equal to the bit.
        out = RawBatch.collate([raw]).to('cpu')[0]
        if raw.erasures is not None:
            erased += 1
            for top, left, h, w in raw.erasures.boxes:
                assert torch.equal(out[:, top:top + h, left:left + w], ref[:, top:top + h, left:left + w])
    assert ops > 20 and flips > 5 and erased > 3  # the draws exercised every part


def test_generators_end_in_the_same_state(one_thread):
    for seed in range(10):
        *_, same_state = _both(_encode(_photo(seed)), seed)
        assert same_state


@pytest.mark.parametrize('kind', ['png', 'grey_jpeg', 'cmyk_jpeg', 'exif_rotated_jpeg', 'png16'])
def test_files_other_than_plain_jpegs_come_out_identical(kind, one_thread):
    photo = _photo(3, sizes=(250, 400))
    if kind == 'png':
        data = _encode(photo, 'PNG')
    elif kind == 'grey_jpeg':
        data = _encode(photo.convert('L'))
    elif kind == 'cmyk_jpeg':
        data = _encode(photo.convert('CMYK'))
    elif kind == 'exif_rotated_jpeg':
        exif = Image.Exif()
        exif[0x0112] = 6
        data = _encode(photo, exif=exif)
    else:
        grey = np.asarray(photo.convert('L'), dtype=np.uint16) * 257
        data = _encode(Image.fromarray(grey), 'PNG')
    for seed in range(6):
        ref, out, _, same_state = _both(data, seed)
        assert torch.equal(ref, out) and same_state


def test_pixels_differ_only_by_resampling(one_thread):
    """PSNR of the fast path against the reference on real photos, same draws. Without RandAugment
    (crop, resize, flip, erasing) every image is close; RandAugment's thresholds (solarize,
    posterize, equalize) can turn a one-level difference into a large one on a few pixels, so
    with it the median is bounded."""
    plain = cfg.load_config(None, ['AUG.AUTO_AUGMENT', 'none', 'AUG.COLOR_JITTER', '0'])
    psnr_plain, psnr_recipe = [], []
    for seed in range(30):
        data = _encode(_photo(seed), quality=int(70 + seed % 25))
        ref, out, *_ = _both(data, seed, plain)
        psnr_plain.append(_psnr(ref, out))
        ref, out, *_ = _both(data, seed)
        psnr_recipe.append(_psnr(ref, out))
    assert min(psnr_plain) >= 40
    assert np.median(psnr_recipe) >= 40 and np.mean(np.minimum(psnr_recipe, 99)) >= 35


def test_large_photos_decode_at_a_reduced_scale(monkeypatch, one_thread):
    """A crop at least twice the output size is decoded at 1/2, 1/4 or 1/8 scale: fewer pixels,
    the same crop, within resampling of the reference."""
    assert _reduction(448, 448, 224, 224) == 2 and _reduction(447, 2000, 224, 224) == 1
    assert _reduction(1800, 1800, 224, 224) == 8 and _reduction(900, 1000, 224, 224) == 4
    plain = cfg.load_config(None, ['AUG.AUTO_AUGMENT', 'none', 'AUG.COLOR_JITTER', '0', 'AUG.REPROB', '0'])
    big = _encode(_photo(5, sizes=(400, 640)).resize((1600, 1200), Image.BICUBIC), quality=92)
    reductions = []
    draft = fast_module._draft_crop_resize

    def spy(header, box, reduction, *args):
        reductions.append(reduction)
        return draft(header, box, reduction, *args)
    monkeypatch.setattr(fast_module, '_draft_crop_resize', spy)
    for seed in range(12):
        ref, out, *_ = _both(big, seed, plain)
        assert _psnr(ref, out) >= 35
    assert len(reductions) >= 6 and max(reductions) >= 4


def test_reduced_decode_of_crops_reaching_the_corner_of_odd_sized_images():
    photo = _photo(7, sizes=(400, 640)).resize((1601, 1203), Image.BICUBIC)
    data = _encode(photo, quality=90)
    for box in ((0, 0, 1601, 1203), (1601 - 900, 1203 - 600, 900, 600), (3, 1, 1598, 1202)):
        left, top, w, h = box
        reduction = _reduction(w, h, 224, 224)
        out = fast_module._draft_crop_resize(Image.open(io.BytesIO(data)), box, reduction, (224, 224),
                                             TF.InterpolationMode.BICUBIC, 'x')
        ref = photo.crop((left, top, left + w, top + h)).resize((224, 224), Image.BICUBIC)
        assert reduction > 1 and out.size == (224, 224)
        header = Image.open(io.BytesIO(data))
        header.draft('RGB', (1601 // reduction, 1203 // reduction))
        assert header.size == (math.ceil(1601 / reduction), math.ceil(1203 / reduction))  # the scale asked for
        mse = np.mean((np.asarray(out, dtype=float) - np.asarray(ref, dtype=float)) ** 2)
        assert 10 * np.log10(255 ** 2 / mse) >= 30  # against the photo itself, before JPEG coding


def test_decoder_choice_is_dispatched_on_what_the_header_says(monkeypatch):
    """Plain 8-bit colour JPEGs go to torchvision's decoder; without it (or without its filter), Pillow."""
    calls = []
    image = Image.new('RGB', (224, 224))
    monkeypatch.setattr(fast_module, '_draft_crop_resize', lambda *a: calls.append('draft') or image)
    monkeypatch.setattr(fast_module.EncodedJpeg, 'decode', lambda self: calls.append('torch') or image)
    fast = build_train_transform(RECIPE)
    data = _encode(_photo(1))
    _seeded(0, lambda: fast._crop_resize(data, 'x'))
    _seeded(0, lambda: fast._crop_resize(_encode(_photo(1), 'PNG'), 'x'))
    fast.use_decode_jpeg = False
    _seeded(0, lambda: fast._crop_resize(data, 'x'))
    assert calls == ['torch']  # the PNG and the decoder turned off took the reference path


@pytest.mark.parametrize('damage', ['truncated', 'not_an_image', 'empty'])
def test_damaged_files_are_named_or_skipped_as_on_the_reference_path(damage, tmp_path, one_thread):
    data = _encode(_photo(2))
    bad = {'truncated': data[:len(data) // 2], 'not_an_image': b'<html>not found</html>', 'empty': b''}[damage]
    for name, content in (('a/0.jpg', data), ('a/1.jpg', bad), ('b/2.jpg', data)):
        path = tmp_path / 'train' / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    fast = build_train_transform(RECIPE)
    strict = RobustImageFolder(str(tmp_path / 'train'), fast)
    with pytest.raises(CorruptImageError, match='1.jpg'):
        strict[1]
    skipping = RobustImageFolder(str(tmp_path / 'train'), fast, skip_corrupt=True)
    image, target, problems = skipping.fetch(1)
    assert isinstance(image, RawImage) and target == 1 and problems[0][0].endswith('1.jpg')


def test_the_training_loader_uses_the_fast_path_by_default(photo_folder, one_thread):
    root = photo_folder(16, 4)
    options = ['DATA.DATA_PATH', str(root), 'DATA.DATASET', 'folder', 'DATA.BATCH_SIZE', '4',
               'DATA.NUM_WORKERS', '0', 'DATA.IMG_SIZE', '64']
    loaders = build_loader(cfg.load_config(None, options))
    images, targets = next(iter(loaders.train))
    assert isinstance(images, RawBatch) and images.pixels.dtype == torch.uint8
    finished = images.to('cpu')
    assert finished.shape == (4, 3, 64, 64) and finished.dtype == torch.float32
    val_images, _ = next(iter(loaders.val))
    # Evaluation is the release's, pixel for pixel: the shorter side to 256/224 of the size
    # (bicubic), the centre crop, ToTensor, Normalize, written out here with torchvision.
    release = T.Compose([T.Resize(int(256 / 224 * 64), interpolation=T.InterpolationMode.BICUBIC),
                         T.CenterCrop(64), T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    files = [path for path, _ in loaders.val.dataset.samples[:4]]
    expected = torch.stack([release(Image.open(path).convert('RGB')) for path in files])
    assert val_images.dtype == torch.float32 and torch.equal(val_images, expected)
    off = build_loader(cfg.load_config(None, options + ['DATA.FAST_PIPELINE', 'False']))
    images, _ = next(iter(off.train))
    assert isinstance(images, torch.Tensor) and images.dtype == torch.float32


def test_zipped_layout_gives_the_same_images_through_the_fast_path(tmp_path, one_thread):
    import zipfile
    from data import ZipImageDataset
    files = {f'n0/{i}.JPEG': _encode(_photo(i)) for i in range(3)}
    with zipfile.ZipFile(tmp_path / 'train.zip', 'w') as z:
        for name, data in files.items():
            z.writestr(name, data)
    (tmp_path / 'train_map.txt').write_text(''.join(f'train.zip@/{name}\t0\n' for name in files))
    dataset = ZipImageDataset(str(tmp_path / 'train.zip'), str(tmp_path / 'train_map.txt'),
                              build_train_transform(RECIPE))
    for i, data in enumerate(files.values()):
        from_zip = _seeded(i, lambda: dataset[i][0])
        direct = _seeded(i, lambda: build_train_transform(RECIPE)(data, 'x'))
        assert torch.equal(from_zip.pixels, direct.pixels)
