"""Train, evaluate or time a FocalNet on ImageNet-1K (or any ImageFolder tree).

Runs as one process (CPU or one GPU), or under torchrun / python -m torch.distributed.launch on one or
many nodes:

    python main.py --cfg configs/focalnet_tiny_srf.yaml --data-path <imagenet> --batch-size 128
    torchrun --nproc_per_node 8 main.py --cfg configs/focalnet_tiny_srf.yaml --data-path <imagenet>
    python main.py --cfg configs/focalnet_tiny_srf.yaml --data-path <imagenet> --eval --resume <ckpt>
    python main.py --cfg configs/focalnet_tiny_srf.yaml --throughput --batch-size 64
"""
import argparse
import logging
import math
import sys

import torch
import torch.nn as nn

from classification.engine import (ClassificationTrainer, NoValidationImages, throughput, train_one_epoch,
                                   validate)
from config import get_config
from data import build_loader
from data.robust import report_skipped
from engine import amp_dtype, make_autocast, match_grad_layout, run_cli
from engine.checkpoint import all_finite
from engine.amp import precision
from engine.cli import add_run_arguments
from engine.epochs import epoch_training, resume_epochs, seed_epoch
from engine.metrics import record, record_evaluation
from engine.resume import load_checkpoint
from engine.run import build_optimization, build_or_explain, settle_config, start_run
from engine.weights import check_weights_path
from errors import UserError
from logger import NAME as LOGGER_NAME
from lr_scheduler import build_scheduler
from models import build_model
from models.cost import count_flops, count_params
from utils import is_distributed

logger = logging.getLogger(LOGGER_NAME)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser('FocalNet training and evaluation')
    add_run_arguments(parser, cfg_help='config file (configs/<model>.yaml)', cfg_required=False,
                      opts_example='TRAIN.EPOCHS 100 DATA.IMG_SIZE 256',
                      data_help='data set root (train/ and val/, or the zipped layout)',
                      pretrained_help='released weights to fine-tune from (official, timm or HF)')
    parser.add_argument('--dataset', choices=['imagenet', 'folder', 'fake'],
                        help='imagenet (default), folder (any ImageFolder tree), fake (synthetic)')
    parser.add_argument('--zip', action='store_true', help='read train.zip / val.zip with their maps')
    parser.add_argument('--cache-mode', choices=['no', 'full', 'part'],
                        help='accepted for the official command line; images are read lazily')
    parser.add_argument('--throughput', action='store_true', help='time inference on synthetic batches')
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def build_criterion(config, mixup) -> nn.Module:
    if mixup is not None:
        from timm.loss import SoftTargetCrossEntropy
        return SoftTargetCrossEntropy()  # label smoothing is folded into the mixed targets
    return nn.CrossEntropyLoss(label_smoothing=config.MODEL.LABEL_SMOOTHING)


def load_weights(config, model: nn.Module, *, fine_tune: bool):
    from models import load_pretrained
    from models.pretrained import CheckpointError
    path = config.MODEL.PRETRAINED
    check_weights_path(path)
    try:
        report = load_pretrained(model, path, replace_classifier=fine_tune)
    except CheckpointError as e:
        # The library's advice is a Python argument; on the command line the remedy is another one.
        message = str(e).replace(
            "to fine-tune with the model's freshly initialised classifier instead, pass replace_classifier=True",
            f'the data set has {config.MODEL.NUM_CLASSES} classes; evaluate on a data set with the '
            f"weights' classes, or fine-tune them on this one (train with --pretrained, without --eval)")
        raise UserError(message) from None
    if not all_finite(model):
        raise UserError(f'{path}: the weights hold non-finite values (NaN or inf); refusing to use them')
    note = ' (classifier re-initialised for this data set)' if report.get('replaced_classifier') else ''
    logger.info(f'loaded {report["layout"]}-layout weights from {path}{note}')


def make_model(config) -> nn.Module:
    return build_or_explain(build_model, config, what='FocalNet')


def _one_backward(model: nn.Module, device: torch.device):
    """A backward pass of a batch of two at the training size: with a batch or a map of one, the
    gradients' layouts are ambiguous."""
    in_chans = model.patch_embed.proj.in_channels
    size = model.img_size if isinstance(model.img_size, (tuple, list)) else (model.img_size,) * 2
    model(torch.zeros(2, in_chans, *size, device=device)).float().sum().backward()


def run_throughput(config, device) -> int:
    model = make_model(config).to(device)
    throughput(model, config, device, make_autocast(device, amp_dtype(config, device)))
    return 0


def run(args) -> int:
    config = get_config(args)
    # Evaluation and timing write no checkpoints: no lock to hold.
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    with start_run(config, args.local_rank, training=training) as started:
        return run_in(config, started.device, started.out)


def run_in(config, device: torch.device, out: str) -> int:
    if config.THROUGHPUT_MODE:
        return run_throughput(config, device)

    loaders = build_loader(config, train=not config.EVAL_MODE)
    config = settle_config(config, out, loaders.num_classes, 'the classes of the data set')
    model = make_model(config).to(device)
    if is_distributed():
        model = match_grad_layout(model, lambda m: _one_backward(m, device))
    logger.info(f'{config.MODEL.NAME}: {count_params(model) / 1e6:.2f}M parameters, '
                f'{count_flops(model, config.DATA.IMG_SIZE) / 1e9:.2f} GFLOPs at {config.DATA.IMG_SIZE} px')
    dtype, autocast = precision(config, device)

    if config.EVAL_MODE:
        if config.MODEL.RESUME:
            state = load_checkpoint(config.MODEL.RESUME, model=model)
            trained = f' (trained {state["epoch"] + 1} epochs)' if state['epoch'] >= 0 else ''
            logger.info(f'evaluating {config.MODEL.RESUME}{trained}')
        elif config.MODEL.PRETRAINED:
            load_weights(config, model, fine_tune=False)
            logger.info(f'evaluating {config.MODEL.PRETRAINED}')
        else:
            raise UserError('--eval needs the weights to evaluate: --resume <checkpoint> or --pretrained <file>')
        result = validate(model, loaders.val, device, autocast)
        source = config.MODEL.RESUME or config.MODEL.PRETRAINED
        logger.info(f'{source}: top-1 {result["acc1"]:.3f}% on {result["images"]} images')
        record_evaluation(out, loaders.val, source, {'val_loss': result['loss'], 'acc1': result['acc1'],
                                                     'acc5': result['acc5'], 'images': result['images']})
        return 0

    return train(config, loaders, model, device, autocast, dtype, out)


def train(config, loaders, model, device, autocast, dtype, out) -> int:
    """``model`` is the bare model; the DDP wrapper (when distributed) only computes the steps."""
    updates = math.ceil(loaders.steps_per_epoch / max(1, config.TRAIN.ACCUMULATION_STEPS))
    optimizer, scheduler, scaler = build_optimization(config, model, device, dtype, lambda opt, scale: (
        build_scheduler(config, opt, updates, scale)))
    ema = None
    if config.TRAIN.EMA.ENABLED:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY)

    def released_weights():
        load_weights(config, model, fine_tune=True)
        if ema is not None:  # the average starts from the released weights
            ema.module.load_state_dict(model.state_dict())

    found = resume_epochs(config, out, loaders, model=model, optimizer=optimizer, scaler=scaler,
                          ema=ema.module if ema is not None else None, load_weights=released_weights)
    if found is None:
        return 0
    resumed, position, _ = found
    # The official code's loader reads the best top-1 as max_accuracy: classification keeps that entry.
    with epoch_training(ClassificationTrainer, config, out, device, loaders, autocast, found, model=model,
                        optimizer=optimizer, scheduler=scheduler, scaler=scaler, score='top-1 (%)',
                        as_max_accuracy=True, saved={'ema': ema.module if ema is not None else None},
                        criterion=build_criterion(config, loaders.mixup), mixup=loaders.mixup,
                        ema=ema) as (trainer, checkpoints):
        for epoch in range(resumed.start, config.TRAIN.EPOCHS):
            resumed_here = seed_epoch(loaders, epoch, position, config.SEED)
            stats = train_one_epoch(trainer, loaders.train, epoch, loaders.steps_per_epoch, resumed_here)
            try:
                val = validate(model, loaders.val, device, autocast)
            except NoValidationImages:
                checkpoints.save(epoch)  # the epoch's training is kept; the run stops for the data to be fixed
                raise
            report_skipped((loaders.train, loaders.val), f'epoch {epoch}', out)
            best_score = checkpoints.best_score = max(checkpoints.best_score, val['acc1'])
            values = {'epoch': epoch, 'train_loss': stats['loss'], 'val_loss': val['loss'],
                      'acc1': val['acc1'], 'acc5': val['acc5'], 'lr': stats['lr'],
                      'epoch_time_s': stats['time_s'], 'max_accuracy': best_score}
            if ema is not None:
                val_ema = validate(ema.module, loaders.val, device, autocast, name='EMA')
                values.update(acc1_ema=val_ema['acc1'], acc5_ema=val_ema['acc5'])
            logger.info(f'epoch {epoch}: acc1 {val["acc1"]:.2f}% (max {best_score:.2f}%), '
                        f'train loss {stats["loss"]:.4f}, {stats["time_s"]:.0f}s')
            record(out, values, trainer.writer, epoch, ('train_loss', 'val_loss', 'acc1', 'acc5'))
            checkpoints.end_epoch(epoch)  # a signal during validation stops here, after saving
    return 0


def main(argv=None) -> int:
    return run_cli(lambda: run(parse_args(argv)))


if __name__ == '__main__':
    sys.exit(main())
