"""Training and evaluation transforms (timm's ImageNet training pipeline, centre-crop evaluation)."""
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

# Images this small (CIFAR-like) get a padded random crop: a random *resized* crop would throw away
# most of their few pixels.
SMALL_IMAGE = 32


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
