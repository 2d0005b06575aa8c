"""Training and evaluation transforms (timm's ImageNet training pipeline, centre-crop evaluation)."""
from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

# Images this small (CIFAR-like) get a padded random crop: a random *resized* crop would throw away
# most of their few pixels.
SMALL_IMAGE = 32


# timm's augmentation ops that posterize; see release_posterize.
POSTERIZE_OPS = ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal')


def release_posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Keep the ``bits_to_keep`` high bits of every channel of an L or RGB image; 0 (or fewer) keeps
    none, which gives a black image.

    The release recipe's RandAugment (``rand-m9-mstd0.5-inc1``) samples magnitudes from N(9, 0.5)
    clipped to [0, 10]; at 10, timm's PosterizeIncreasing asks for 0 bits (AutoAugment's ``v0``
    policy does so at magnitude 2). The Pillow of the releases (9.x, and every release up to 12.x)
    returned a black image; Pillow 13 raises ValueError instead, for about one training image in 660
    (one batch of 128 in six), so a run stopped within its first steps. This is the old Pillow's
    lookup table, written out so that it gives the same image on every Pillow. We replace the
    operation rather than cap Pillow below 13: a cap would hold back fixes to the library that
    decodes every training image, and would not help anyone who already has Pillow 13 installed.
    """
    if bits_to_keep >= 8:
        return img
    if img.mode not in ('L', 'RGB'):
        raise ValueError(f'posterize needs an L or RGB image, got mode {img.mode}')
    mask = 0xFF ^ ((1 << (8 - max(bits_to_keep, 0))) - 1)  # e.g. 4 bits: 0xF0; 0 bits: 0
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _use_release_posterize(transform: T.Compose) -> None:
    """Make every posterize op of timm's RandAugment, AutoAugment or AugMix in ``transform`` use
    :func:`release_posterize`. Only this transform changes; timm's tables stay as they are."""
    for step in transform.transforms:
        ops = list(getattr(step, 'ops', ()))           # RandAugment, AugMixAugment
        for sub_policy in getattr(step, 'policy', ()):  # AutoAugment
            ops.extend(sub_policy)
        for op in ops:
            if isinstance(op, auto_augment.AugmentOp) and op.name in POSTERIZE_OPS:
                op.aug_fn = release_posterize


def _interpolation(name: str) -> T.InterpolationMode:
    # 'random' is a training-only choice in timm; evaluation is deterministic.
    return T.InterpolationMode.BILINEAR if name == 'random' else T.InterpolationMode(name)


def build_transform(is_train: bool, config) -> T.Compose:
    size = config.DATA.IMG_SIZE
    if is_train:
        aug = config.AUG
        transform = create_transform(
            input_size=size,
            is_training=True,
            hflip=aug.HFLIP,
            color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
            auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT not in ('', 'none') else None,
            re_prob=aug.REPROB,
            re_mode=aug.REMODE,
            re_count=aug.RECOUNT,
            interpolation=config.DATA.INTERPOLATION,
        )
        _use_release_posterize(transform)
        if size <= SMALL_IMAGE:
            transform.transforms[0] = T.Compose([
                T.Resize((size, size), interpolation=_interpolation(config.DATA.INTERPOLATION)),
                T.RandomCrop(size, padding=4),
            ])
        return transform

    interpolation = _interpolation(config.DATA.INTERPOLATION)
    if size <= SMALL_IMAGE:
        resize = [T.Resize((size, size), interpolation=interpolation)]
    elif config.TEST.CROP:
        # Resize the shorter side to size * 256 / 224, as at 224 px, then take the centre.
        resize = [T.Resize(int(256 / 224 * size), interpolation=interpolation), T.CenterCrop(size)]
    else:
        resize = [T.Resize((size, size), interpolation=interpolation)]
    return T.Compose(resize + [T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
