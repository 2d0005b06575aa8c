"""Every setting of a training or evaluation run, with its default.

Merge order: these defaults, a YAML file (its ``BASE`` files first), ``--opts KEY VALUE`` pairs, then
the named command-line flags. The result is frozen. The defaults are the paper's ImageNet-1K recipe
for FocalNet-T (SRF); a file in configs/ holds only what differs for its model. What each key allows
is in engine/config_checks.py, how files and --opts are read and merged in engine/config_merge.py.
"""
import os
from typing import Iterable, Optional, Tuple

from yacs.config import CfgNode as CN

from engine.config_checks import validate
from engine.config_merge import merge_file, merge_opts, merge_stored, set_key
from errors import UserError
_C = CN()
# Files merged before this one, relative to it.
_C.BASE = ['']

# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
_C.DATA = CN()
# Images per process and step (the global batch is this times the number of processes).
_C.DATA.BATCH_SIZE = 128
# Root of the data set: train/ and val/ folders, or train.zip, val.zip and their map files.
_C.DATA.DATA_PATH = ''
# 'imagenet' (ImageFolder train/ and val/), 'folder' (any such tree), 'fake' (synthetic images).
_C.DATA.DATASET = 'imagenet'
# Training and evaluation resolution.
_C.DATA.IMG_SIZE = 224
# Resize interpolation: 'bicubic', 'bilinear' or 'random' (training only).
_C.DATA.INTERPOLATION = 'bicubic'
# Read the official zipped layout (train.zip, val.zip, train_map.txt, val_map.txt).
_C.DATA.ZIP_MODE = False
# Accepted for the official command line ('no', 'part', 'full'); images are read from the zip lazily.
_C.DATA.CACHE_MODE = 'part'
# Pin host memory in the loader, for faster copies to the GPU.
_C.DATA.PIN_MEMORY = True
# Loader worker processes per training process.
_C.DATA.NUM_WORKERS = 8
# An unreadable image (truncated, not an image) stops the run, naming the file; True skips such
# files instead (a training image is replaced by the next readable one) and logs which and how many.
_C.DATA.SKIP_CORRUPT = False
# Training images of the 'fake' data set (its validation set is a quarter of this).
_C.DATA.FAKE_SIZE = 1024
# Training images take the fast input path (data/fast_transform.py): the release recipe's random
# draws, with a cheaper decode and resize, and normalisation and erasing on the training device (on
# a GPU, the flip and RandAugment's ops too, with Pillow's pixels: data/device_augment.py).
# False: timm's transform, as the releases ran it. Evaluation is the same either way.
_C.DATA.FAST_PIPELINE = True
# With FAST_PIPELINE, on a GPU: plain JPEGs are decoded there, in batches, with nvJPEG
# (torchvision.io.decode_jpeg(device='cuda')), when no op in the loader worker needs their pixels;
# the workers then only read headers and draw. Off by default (docs/classification.md).
_C.DATA.GPU_DECODE = False
# With FAST_PIPELINE: where the flip and RandAugment's ops are applied. 'auto': on the training GPU
# when there is one (data/device_augment.py), else in the loader workers; 'worker': always in the
# loader workers with Pillow (for a GPU that has no time to spare).
_C.DATA.AUGMENT_ON = 'auto'

# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------
_C.MODEL = CN()
# Architecture family; 'focal' (the official name) and the registered model names are accepted.
_C.MODEL.TYPE = 'focalnet'
# Run name: the output folder is <OUTPUT>/<NAME>/<TAG>.
_C.MODEL.NAME = 'focalnet_tiny_srf'
# Released weights to fine-tune from (any layout models.load_pretrained reads).
_C.MODEL.PRETRAINED = ''
# Checkpoint to resume training from, or to evaluate.
_C.MODEL.RESUME = ''
# Classes of the classifier; 'imagenet' and 'folder' data sets set it from the data.
_C.MODEL.NUM_CLASSES = 1000
# Dropout before the classifier and inside the blocks.
_C.MODEL.DROP_RATE = 0.0
# Stochastic depth at the last block (0.2 / 0.3 / 0.5 for tiny / small / base in the paper).
_C.MODEL.DROP_PATH_RATE = 0.2
# Label smoothing (folded into the mixup targets when mixup or cutmix is on).
_C.MODEL.LABEL_SMOOTHING = 0.1

# The architecture (read by models.registry.model_kwargs_from_config).
_C.MODEL.FOCAL = CN()
_C.MODEL.FOCAL.PATCH_SIZE = 4
_C.MODEL.FOCAL.IN_CHANS = 3
# Width of the first stage; each later stage doubles it.
_C.MODEL.FOCAL.EMBED_DIM = 96
_C.MODEL.FOCAL.DEPTHS = [2, 2, 6, 2]
_C.MODEL.FOCAL.MLP_RATIO = 4.0
_C.MODEL.FOCAL.PATCH_NORM = True
# Per stage: number of focal levels, smallest kernel, kernel growth per level.
_C.MODEL.FOCAL.FOCAL_LEVELS = [2, 2, 2, 2]
_C.MODEL.FOCAL.FOCAL_WINDOWS = [3, 3, 3, 3]
_C.MODEL.FOCAL.FOCAL_FACTORS = [2, 2, 2, 2]
# Overlapping stem and downsamplers (the large models).
_C.MODEL.FOCAL.USE_CONV_EMBED = False
_C.MODEL.FOCAL.USE_LAYERSCALE = False
_C.MODEL.FOCAL.LAYERSCALE_VALUE = 1e-4
_C.MODEL.FOCAL.USE_POSTLN = False
_C.MODEL.FOCAL.USE_POSTLN_IN_MODULATION = False
_C.MODEL.FOCAL.NORMALIZE_MODULATOR = False

# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
_C.TRAIN = CN()
# First epoch; set from the checkpoint when resuming.
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
# The learning rates below are for a global batch (images per optimizer step over all processes) of
# BASE_BATCH_SIZE; every task scales them linearly with the actual one, DATA.BATCH_SIZE x processes x
# accumulation (lr_scheduler.lr_scale). 512 for ImageNet; the COCO and ADE20K recipes set 16.
_C.TRAIN.BASE_BATCH_SIZE = 512
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
# Clip the gradient norm to this (0 turns clipping off).
_C.TRAIN.CLIP_GRAD = 5.0
# Continue from the newest checkpoint in the output folder.
_C.TRAIN.AUTO_RESUME = True
# Micro-batches per optimizer step (0 and 1 both mean none).
_C.TRAIN.ACCUMULATION_STEPS = 1
# Recompute block activations in the backward pass to save memory.
_C.TRAIN.USE_CHECKPOINT = False
# Layer-wise learning-rate decay, for fine-tuning: the rate of each block is this factor times the
# rate of the block above it (the classifier learns at the full rate, the stem at the smallest).
# 1.0 turns it off; 0.7-0.9 is usual for fine-tuning released weights.
_C.TRAIN.LAYER_DECAY = 1.0

_C.TRAIN.LR_SCHEDULER = CN()
# 'cosine', 'linear' or 'step'; updated every optimizer step.
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'
# 'step' only: epochs between decays, and the factor.
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1

_C.TRAIN.OPTIMIZER = CN()
# 'adamw' or 'sgd'.
_C.TRAIN.OPTIMIZER.NAME = 'adamw'
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
# 'sgd' only.
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

# Exponential moving average of the weights, evaluated alongside the model when on.
_C.TRAIN.EMA = CN()
_C.TRAIN.EMA.ENABLED = False
_C.TRAIN.EMA.DECAY = 0.9998

# ---------------------------------------------------------------------------------------------------
# Augmentation (training only)
# ---------------------------------------------------------------------------------------------------
_C.AUG = CN()
# Colour jitter strength (0 turns it off; unused when AUTO_AUGMENT is set, as in timm).
_C.AUG.COLOR_JITTER = 0.4
# timm auto-augment policy, or 'none'.
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'
# Probability of a horizontal flip (0 for data where left and right differ, such as digits).
_C.AUG.HFLIP = 0.5
# Random erasing: probability, mode and count.
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = 'pixel'
_C.AUG.RECOUNT = 1
# Mixup and cutmix alphas (0 turns each off).
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
# Cutmix box ratio bounds; overrides CUTMIX when set.
_C.AUG.CUTMIX_MINMAX = None
# Probability of applying mixup or cutmix to a batch, and of choosing cutmix when both are on.
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
# Mixup parameters drawn per 'batch', 'pair' or 'elem'.
_C.AUG.MIXUP_MODE = 'batch'

# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------
_C.TEST = CN()
# Resize to IMG_SIZE * 256 / 224 and centre-crop (else resize straight to IMG_SIZE).
_C.TEST.CROP = True

# ---------------------------------------------------------------------------------------------------
# Object detection (python -m detection; main.py ignores this group)
# ---------------------------------------------------------------------------------------------------
# The backbone is the one MODEL.FOCAL.*, MODEL.DROP_PATH_RATE and TRAIN.USE_CHECKPOINT describe; the
# optimizer and its rate, decay and clipping are TRAIN.*. The schedule is the detection one below:
# TRAIN.LR_SCHEDULER.NAME, TRAIN.WARMUP_EPOCHS and TRAIN.MIN_LR do not apply. DATA.DATA_PATH is the
# COCO root, DATA.BATCH_SIZE the images per process, MODEL.NUM_CLASSES is set from the annotations.
_C.DETECTION = CN()
# torchvision detector: 'mask_rcnn', 'faster_rcnn' (FPN on stages 0-3 plus a max-pooled level),
# 'retinanet' or 'fcos' (FPN on stages 1-3 plus P6 and P7); or one written with mmdetection's names:
# 'atss', 'cascade_mask_rcnn', 'sparse_rcnn' (detection/atss.py, cascade_rcnn.py, sparse_rcnn.py).
_C.DETECTION.METHOD = 'mask_rcnn'
# <DATA_PATH>/<split>/ images and <DATA_PATH>/annotations/instances_<split>.json.
_C.DETECTION.TRAIN_SPLIT = 'train2017'
_C.DETECTION.VAL_SPLIT = 'val2017'
# Training images without a single non-crowd object are left out (as mmdetection's filter_empty_gt).
_C.DETECTION.FILTER_EMPTY = True
# Channels of the feature pyramid, and of the two-stage heads: the box head's two fully connected
# layers and the mask head's four convolutions (256 / 1024 / 256 in the paper's Mask R-CNN).
_C.DETECTION.FPN_CHANNELS = 256
_C.DETECTION.BOX_HEAD_DIM = 1024
_C.DETECTION.MASK_HEAD_DIM = 256
# Anchors the RPN samples per image and proposals the box head samples per image (two-stage).
_C.DETECTION.RPN_BATCH_SIZE = 256
_C.DETECTION.ROI_BATCH_SIZE = 512
# Resizing happens in the detector: in training the shorter side is drawn per image from
# MIN_SIZE_TRAIN, at test time it is MIN_SIZE_TEST; the longer side is capped at MAX_SIZE.
_C.DETECTION.MIN_SIZE_TRAIN = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
_C.DETECTION.MIN_SIZE_TEST = 800
_C.DETECTION.MAX_SIZE = 1333
_C.DETECTION.HFLIP = 0.5
# The official recipe's second augmentation policy, taken for half the training images: shorter
# side resized to one of CROP_RESIZE, a random crop of CROP_SIZE[0]..CROP_SIZE[1] pixels a side, then
# the multi-scale resize. An empty CROP_RESIZE turns it off.
_C.DETECTION.CROP_RESIZE = [400, 500, 600]
_C.DETECTION.CROP_SIZE = [384, 600]
# Learning rate: TRAIN.BASE_LR is for a global batch of TRAIN.BASE_BATCH_SIZE images (scaled
# linearly); linear warm-up from TRAIN.WARMUP_LR over WARMUP_ITERS optimizer steps; multiplied by
# TRAIN.LR_SCHEDULER.DECAY_RATE at the start of each epoch listed in LR_STEPS.
_C.DETECTION.WARMUP_ITERS = 500
_C.DETECTION.LR_STEPS = [9, 11]
# Training batches hold images of one orientation (landscape or not), as mmdetection's GroupSampler.
_C.DETECTION.GROUP_ASPECT_RATIO = True
# Weight decay as the official configs: 'official' spares only parameters named *norm* (biases and
# layer scales are decayed); 'classification' spares every 1-D parameter, as optimizer.py does;
# 'all' spares none (the official Sparse R-CNN config, which sets no parameter-wise rule).
_C.DETECTION.DECAY_GROUPS = 'official'
# Test time: detections kept per image, and the score they need.
_C.DETECTION.SCORE_THRESH = 0.05
_C.DETECTION.DETECTIONS_PER_IMAGE = 100
# Evaluate on the validation set every EVAL_FREQ epochs, and after the last.
_C.DETECTION.EVAL_FREQ = 1
# Sparse R-CNN (METHOD 'sparse_rcnn'): learned proposals, refinement stages, the width of each
# stage's FFN and of its dynamic convolution. Its test keeps the best DETECTIONS_PER_IMAGE
# (proposal, class) scores, with no SCORE_THRESH and no NMS (the official config).
_C.DETECTION.SPARSE = CN()
_C.DETECTION.SPARSE.NUM_PROPOSALS = 300
_C.DETECTION.SPARSE.NUM_STAGES = 6
_C.DETECTION.SPARSE.FFN_CHANNELS = 2048
_C.DETECTION.SPARSE.DYNAMIC_CHANNELS = 64

# ---------------------------------------------------------------------------------------------------
# Semantic segmentation (python -m segmentation): UPerNet on the dense FocalNet backbone.
# The keys above keep their meaning: the backbone is MODEL.FOCAL.*, MODEL.DROP_PATH_RATE and
# TRAIN.USE_CHECKPOINT; MODEL.NUM_CLASSES is the number of classes; the optimizer is TRAIN.BASE_LR,
# TRAIN.WEIGHT_DECAY, TRAIN.OPTIMIZER.*, TRAIN.CLIP_GRAD, TRAIN.ACCUMULATION_STEPS; the poly schedule
# starts at TRAIN.WARMUP_LR and ends at TRAIN.MIN_LR; DATA.BATCH_SIZE is images per process and
# iteration. configs/segmentation/base/ade20k_160k.yaml sets them to the official ADE20K recipe.
# ---------------------------------------------------------------------------------------------------
_C.SEG = CN()
# Label files hold 0 for unlabelled pixels (ignored) and 1..N for the classes, as ADE20K: shift them to
# 0..N-1. False: the files hold 0..N-1. The value 255 is ignored either way.
_C.SEG.REDUCE_ZERO_LABEL = True
# Names of the MODEL.NUM_CLASSES classes, for the per-class tables and drawn predictions; empty:
# ADE20K's 150 names when there are 150 classes, else 'class <i>'.
_C.SEG.CLASS_NAMES = []

_C.SEG.HEAD = CN()
# UPerNet decode head: width of every conv block, pyramid pooling grid sizes, dropout before the
# classifier (also the auxiliary head's).
_C.SEG.HEAD.CHANNELS = 512
_C.SEG.HEAD.POOL_SCALES = [1, 2, 3, 6]
_C.SEG.HEAD.DROPOUT = 0.1
# Auxiliary FCN head (training only): width, the backbone stage it reads, its loss weight (0 removes it).
_C.SEG.HEAD.AUX_CHANNELS = 256
_C.SEG.HEAD.AUX_INDEX = 2
_C.SEG.HEAD.AUX_WEIGHT = 0.4

_C.SEG.TRAIN = CN()
# Optimizer steps of the run, of the linear warm-up from TRAIN.WARMUP_LR, and the power of the poly
# decay to TRAIN.MIN_LR (counted from step 0, as mmcv's poly policy).
_C.SEG.TRAIN.ITERS = 160000
_C.SEG.TRAIN.WARMUP_ITERS = 1500
_C.SEG.TRAIN.POLY_POWER = 1.0
# Evaluate on the validation set, and save a checkpoint, every this many steps (and after the last).
_C.SEG.TRAIN.EVAL_INTERVAL = 16000
_C.SEG.TRAIN.SAVE_INTERVAL = 16000

_C.SEG.AUG = CN()
# Random rescale: the image is fitted into SCALE x r (long edge, short edge), r uniform in RATIO_RANGE.
_C.SEG.AUG.SCALE = [2048, 512]
_C.SEG.AUG.RATIO_RANGE = [0.5, 2.0]
# Random square crop (padded up to it where the image is smaller); a crop whose most frequent class
# covers CAT_MAX_RATIO or more of it is redrawn (up to ten times; 1.0 turns this off).
_C.SEG.AUG.CROP_SIZE = 512
_C.SEG.AUG.CAT_MAX_RATIO = 0.75
# Probability of a horizontal flip; mmseg's photometric distortion on or off.
_C.SEG.AUG.FLIP = 0.5
_C.SEG.AUG.PHOTOMETRIC = True

_C.SEG.TEST = CN()
# 'whole': the image fitted into SCALE x ratio in one pass; 'slide': CROP_SIZE windows every STRIDE pixels.
_C.SEG.TEST.MODE = 'whole'
_C.SEG.TEST.SCALE = [2048, 512]
_C.SEG.TEST.STRIDE = 341
_C.SEG.TEST.CROP_SIZE = 512
# Scale ratios and flipping averaged at test time (single scale: [1.0], no flip). --aug-test uses
# AUG_RATIOS with flipping, the "mIoU (MS)" of the paper.
_C.SEG.TEST.RATIOS = [1.0]
_C.SEG.TEST.FLIP = False
_C.SEG.TEST.AUG_RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]

# ---------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------
# Mixed precision: 'O0' turns it off; anything else uses torch.amp on CUDA (bfloat16 where the GPU
# supports it, else float16 with a gradient scaler). The CPU always runs in float32.
_C.AMP_OPT_LEVEL = 'O1'
# Root of the outputs; a run writes to <OUTPUT>/<MODEL.NAME>/<TAG>.
_C.OUTPUT = 'output'
_C.TAG = 'default'
# Save a checkpoint every SAVE_FREQ epochs, and after the last.
_C.SAVE_FREQ = 1
# Keep only the newest SAVE_KEEP checkpoints in the output folder (0 keeps all).
_C.SAVE_KEEP = 0
# Also save part-way through an epoch every SAVE_MINUTES minutes of training (0: off), so that a run
# killed without warning loses at most that much; only the newest such checkpoint is kept. A SIGTERM
# or SIGINT always saves the position reached before the run stops.
_C.SAVE_MINUTES = 0.0
# Seconds a distributed collective waits for the other processes before failing (a process that died
# or hangs then takes the job down instead of leaving the others waiting).
_C.DIST_TIMEOUT = 1800
# Log every PRINT_FREQ steps.
_C.PRINT_FREQ = 100
_C.SEED = 0
# Set by --eval and --throughput.
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False


def defaults() -> CN:
    return _C.clone()


def load_config(cfg_path: Optional[str] = None, opts: Iterable[str] = (),
                overrides: Optional[dict] = None, *, stored: Optional[Tuple[str, str]] = None) -> CN:
    """Defaults, then ``stored`` (YAML text of a config and where it comes from: a checkpoint's), then
    the YAML file at ``cfg_path`` (with its BASE files), then ``opts`` (KEY VALUE strings), then
    ``overrides`` (KEY: value, already typed); checked and frozen."""
    config = defaults()
    if stored is not None:
        merge_stored(config, *stored, _C)
    if cfg_path:
        merge_file(config, cfg_path, _C)
    merge_opts(config, opts or (), _C)
    for key, value in (overrides or {}).items():
        set_key(config, key, value)
    validate(config)
    config.freeze()
    return config


# Named flags of main.py and the keys they set.
_FLAGS = {
    'batch_size': 'DATA.BATCH_SIZE',
    'data_path': 'DATA.DATA_PATH',
    'dataset': 'DATA.DATASET',
    'zip': 'DATA.ZIP_MODE',
    'cache_mode': 'DATA.CACHE_MODE',
    'resume': 'MODEL.RESUME',
    'pretrained': 'MODEL.PRETRAINED',
    'accumulation_steps': 'TRAIN.ACCUMULATION_STEPS',
    'use_checkpoint': 'TRAIN.USE_CHECKPOINT',
    'amp_opt_level': 'AMP_OPT_LEVEL',
    'output': 'OUTPUT',
    'tag': 'TAG',
    'eval': 'EVAL_MODE',
    'throughput': 'THROUGHPUT_MODE',
}


def get_config(args, require_cfg: bool = False) -> CN:
    """The final config of a run: ``load_config`` plus the named flags given in ``args`` (a flag left
    out, None or False, keeps the config's value). ``--eval --resume <training checkpoint>`` starts
    from the config stored in the checkpoint, so that the model is the one trained; --cfg, --opts and
    the flags then override only the keys they name. ``require_cfg``: a config file is needed
    otherwise (the defaults describe no detector or segmentor)."""
    resumed_eval = getattr(args, 'eval', False) and getattr(args, 'resume', None)
    if require_cfg and not args.cfg and not resumed_eval:
        raise UserError('--cfg <config file> is needed (only --eval --resume <training checkpoint> can do '
                        'without: the checkpoint stores its config)')
    # ``is``, not ``in (None, False)``: 0 == False, and --batch-size 0 must reach the range check.
    overrides = {key: value for attr, key in _FLAGS.items()
                 if (value := getattr(args, attr, None)) is not None and value is not False}
    stored = None
    if resumed_eval:
        text = stored_config(args.resume)
        stored = (text, f'the config stored in {args.resume}') if text is not None else None
    return load_config(args.cfg, args.opts or (), overrides, stored=stored)


def stored_config(path: str) -> Optional[str]:
    """The config a training checkpoint of this codebase stores (YAML text); None for other files
    (released weights, the official checkpoints' pickled configs) and for files that cannot be read."""
    from engine.checkpoint import read_checkpoint
    try:
        ckpt = read_checkpoint(path, mmap=True)
    except UserError:  # missing or unreadable: the task's loading says so, in its own words
        return None
    text = ckpt.get('config') if isinstance(ckpt, dict) else None
    return text if isinstance(text, str) else None


def with_num_classes(config: CN, num_classes: int) -> CN:
    """The config with MODEL.NUM_CLASSES set to what the data set holds."""
    if config.MODEL.NUM_CLASSES == num_classes:
        return config
    config = config.clone()
    config.defrost()
    config.MODEL.NUM_CLASSES = num_classes
    config.freeze()
    return config


def output_dir(config: CN) -> str:
    return os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
