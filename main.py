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
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import faults
from config import get_config, lr_scale, output_dir, with_num_classes
from data import build_loader
from data.robust import report_skipped
from engine import (OptimizerStep, Progress, amp_dtype, append_metrics, drop_metrics_from,
                    make_autocast, make_scaler, match_grad_layout, memory_mb, run_cli, wrap_ddp)
from errors import UserError
from logger import NAME as LOGGER_NAME, create_logger
from lr_scheduler import build_scheduler
from models import build_model
from models.cost import count_flops, count_params
from optimizer import build_optimizer
from utils import (all_reduce_sum, auto_resume_file, checkpoint_path, derive_seed, get_rank,
                   get_world_size, init_distributed, is_distributed, load_checkpoint, save_checkpoint,
                   seed_everything)

logger = logging.getLogger(LOGGER_NAME)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser('FocalNet training and evaluation')
    parser.add_argument('--cfg', metavar='FILE', help='config file (configs/<model>.yaml)')
    parser.add_argument('--opts', nargs='+', default=None, metavar='KEY VALUE',
                        help='override config keys: --opts TRAIN.EPOCHS 100 DATA.IMG_SIZE 256')
    parser.add_argument('--batch-size', type=int, help='images per process and step')
    parser.add_argument('--data-path', help='data set root (train/ and val/, or the zipped layout)')
    parser.add_argument('--dataset', choices=['imagenet', 'folder', 'fake'],
                        help='imagenet (default), folder (any ImageFolder tree), fake (synthetic)')
    parser.add_argument('--zip', action='store_true', help='read train.zip / val.zip with their maps')
    parser.add_argument('--cache-mode', choices=['no', 'full', 'part'],
                        help='accepted for the official command line; images are read lazily')
    parser.add_argument('--resume', help='checkpoint to resume from, or to evaluate with --eval')
    parser.add_argument('--pretrained', help='released weights to fine-tune from (official, timm or HF)')
    parser.add_argument('--accumulation-steps', type=int, help='micro-batches per optimizer step')
    parser.add_argument('--use-checkpoint', action='store_true', help='gradient checkpointing')
    parser.add_argument('--amp-opt-level', choices=['O0', 'O1', 'O2'],
                        help='O0 turns mixed precision off; O1 and O2 both use torch.amp')
    parser.add_argument('--output', metavar='PATH', help='output root; a run writes <output>/<name>/<tag>')
    parser.add_argument('--tag', help='name of the run under the model name')
    parser.add_argument('--eval', action='store_true', help='evaluate only')
    parser.add_argument('--throughput', action='store_true', help='time inference on synthetic batches')
    # Passed by the legacy torch.distributed.launch; torchrun sets LOCAL_RANK in the environment instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@dataclass
class Trainer:
    """The pieces a training step uses."""
    config: object
    model: nn.Module            # what the step calls (the DDP wrapper when distributed)
    module: nn.Module           # the bare model: saved, and given to the optimizer
    criterion: Callable
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    optimizer_step: OptimizerStep
    device: torch.device
    mixup: Optional[Callable] = None
    ema: Optional[nn.Module] = None
    writer: Optional[object] = None


def train_one_epoch(t: Trainer, loader, epoch: int) -> dict:
    cfg = t.config
    t.model.train()
    num_steps = len(loader)
    accumulation = t.optimizer_step.accumulation
    updates_per_epoch = math.ceil(num_steps / accumulation)
    loss_sum = norm_sum = 0.0
    updates = 0
    progress = Progress(num_steps)
    t.optimizer.zero_grad(set_to_none=True)
    for idx, (images, targets) in enumerate(loader):
        images = images.to(t.device, non_blocking=True)
        targets = targets.to(t.device, non_blocking=True)
        if t.mixup is not None:
            images, targets = t.mixup(images, targets)
        faults.inject('step', epoch * num_steps + idx, get_rank())
        step = epoch * updates_per_epoch + idx // accumulation
        if idx % accumulation == 0:
            t.scheduler.step_update(step)  # the rate of this optimizer step
        loss_value, grad_norm = t.optimizer_step(
            lambda: t.criterion(t.model(images), targets), idx, num_steps,
            f'at epoch {epoch} step {idx}/{num_steps}; nothing was saved for this epoch')
        if grad_norm is not None:
            if t.ema is not None:
                t.ema.update(t.module, step=step)
            norm_sum += grad_norm.item()
            updates += 1
        loss_sum += loss_value
        tick = progress.tick(idx)
        if idx % cfg.PRINT_FREQ == 0 or idx + 1 == num_steps:
            lr = t.optimizer.param_groups[0]['lr']
            grad_norm = t.optimizer_step.grad_norm.item()
            logger.info(f'Train: [{epoch}/{cfg.TRAIN.EPOCHS}][{idx}/{num_steps}]  '
                        f'eta {tick["eta"]}  lr {lr:.6e}  '
                        f'time {tick["time"]:.3f}  loss {loss_value:.4f} ({loss_sum / (idx + 1):.4f})  '
                        f'grad_norm {grad_norm:.4f}{memory_mb(t.device)}')
            if t.writer is not None:
                global_step = epoch * num_steps + idx
                t.writer.add_scalar('train/loss', loss_value, global_step)
                t.writer.add_scalar('train/lr', lr, global_step)
                t.writer.add_scalar('train/grad_norm', grad_norm, global_step)
    return {'loss': loss_sum / num_steps, 'grad_norm': norm_sum / max(1, updates),
            'lr': t.optimizer.param_groups[0]['lr'], 'time_s': time.time() - progress.start}


@torch.inference_mode()
def validate(model: nn.Module, loader, device: torch.device, autocast=nullcontext,
             name: str = '') -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole validation set, all processes."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(targets[:, None])
        totals += torch.stack([F.cross_entropy(logits, targets, reduction='sum').double(),
                               hits[:, :1].sum().double(), hits.sum().double(),
                               torch.tensor(float(len(targets)), dtype=torch.float64, device=device)])
    loss, top1, top5, n = all_reduce_sum(totals).tolist()
    n = max(n, 1.0)
    result = {'loss': loss / n, 'acc1': 100 * top1 / n, 'acc5': 100 * top5 / n, 'images': int(n)}
    logger.info(f'{name} * Acc@1 {result["acc1"]:.3f} Acc@5 {result["acc5"]:.3f}'.lstrip())
    return result


@torch.inference_mode()
def throughput(model: nn.Module, config, device: torch.device, autocast=nullcontext) -> dict:
    """Images per second of inference on synthetic batches, after a warm-up."""
    model.eval()
    batch, size = config.DATA.BATCH_SIZE, config.DATA.IMG_SIZE
    images = torch.randn(batch, 3, size, size, device=device)
    warmup, timed = (50, 30) if device.type == 'cuda' else (2, 5)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    with autocast():
        for _ in range(warmup):
            model(images)
        sync()
        tic = time.perf_counter()
        for _ in range(timed):
            model(images)
        sync()
    seconds = time.perf_counter() - tic
    result = {'images_per_s': timed * batch / seconds, 'batch_size': batch, 'img_size': size,
              'params': count_params(model), 'gflops': count_flops(model, size) / 1e9}
    logger.info(f'batch_size {batch} throughput {result["images_per_s"]:.1f} images/s '
                f'({timed} batches after {warmup} warm-up, {device.type}, '
                f'params {result["params"] / 1e6:.2f}M, GFLOPs {result["gflops"]:.2f})')
    return result


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
    report = load_pretrained(model, config.MODEL.PRETRAINED, replace_classifier=fine_tune)
    note = ' (classifier re-initialised for this data set)' if report.get('replaced_classifier') else ''
    logger.info(f'loaded {report["layout"]}-layout weights from {config.MODEL.PRETRAINED}{note}')


def make_model(config) -> nn.Module:
    try:
        return build_model(config)
    except (ValueError, TypeError) as e:
        raise UserError(f'the config does not describe a valid FocalNet: {e}') from None


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
    device = init_distributed(args.local_rank, config.DIST_TIMEOUT)
    rank = get_rank()
    out = output_dir(config)
    create_logger(out, rank)
    logger.info(f'rank {rank} of {get_world_size()} on {device}')
    if config.THROUGHPUT_MODE:
        return run_throughput(config, device)

    loaders = build_loader(config, train=not config.EVAL_MODE)
    if loaders.num_classes != config.MODEL.NUM_CLASSES:
        logger.info(f'MODEL.NUM_CLASSES: {loaders.num_classes} (the classes of the data set; '
                    f'the config said {config.MODEL.NUM_CLASSES})')
    config = with_num_classes(config, loaders.num_classes)
    if rank == 0:  # an evaluation leaves the training run's config.yaml alone
        name = 'config_eval.yaml' if config.EVAL_MODE else 'config.yaml'
        with open(os.path.join(out, name), 'w') as f:
            f.write(config.dump())
    logger.info(f'config:\n{config.dump()}')

    seed_everything(config.SEED)  # the same initial weights in every process
    model = make_model(config).to(device)
    if is_distributed():
        model = match_grad_layout(model, lambda m: _one_backward(m, device))
    logger.info(f'{config.MODEL.NAME}: {count_params(model) / 1e6:.2f}M parameters, '
                f'{count_flops(model, config.DATA.IMG_SIZE) / 1e9:.2f} GFLOPs at {config.DATA.IMG_SIZE} px')
    dtype = amp_dtype(config, device)
    autocast = make_autocast(device, dtype)
    metrics_path = os.path.join(out, 'metrics.jsonl')

    if config.EVAL_MODE:
        if config.MODEL.RESUME:
            load_checkpoint(config.MODEL.RESUME, model=model)
        elif config.MODEL.PRETRAINED:
            load_weights(config, model, fine_tune=False)
        else:
            raise UserError('--eval needs the weights to evaluate: --resume <checkpoint> or --pretrained <file>')
        result = validate(model, loaders.val, device, autocast)
        report_skipped((loaders.val,), 'evaluation', out)
        if rank == 0:
            append_metrics(metrics_path, {'mode': 'eval', 'checkpoint': config.MODEL.RESUME or config.MODEL.PRETRAINED,
                                          'val_loss': result['loss'], 'acc1': result['acc1'],
                                          'acc5': result['acc5'], 'images': result['images']})
        return 0

    return train(config, loaders, model, device, autocast, dtype, out, metrics_path)


def train(config, loaders, model, device, autocast, dtype, out, metrics_path) -> int:
    rank = get_rank()
    resume = config.MODEL.RESUME
    if config.TRAIN.AUTO_RESUME:
        found = auto_resume_file(out)
        if found:
            if resume and os.path.abspath(resume) != os.path.abspath(found):
                logger.warning(f'auto-resume: using {found} instead of {resume}')
            resume = found
    if config.MODEL.PRETRAINED and not resume:
        load_weights(config, model, fine_tune=True)
    scale = lr_scale(config, get_world_size())
    optimizer = build_optimizer(config, model, scale)
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    scheduler = build_scheduler(config, optimizer, math.ceil(len(loaders.train) / accumulation), scale)
    scaler = make_scaler(device, dtype)
    ema = None
    if config.TRAIN.EMA.ENABLED:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY)
    logger.info(f'learning rate {config.TRAIN.BASE_LR * scale:.3e} (BASE_LR x {scale:g}: '
                f'global batch {config.DATA.BATCH_SIZE * get_world_size() * accumulation} / 512)')

    start_epoch, max_accuracy = config.TRAIN.START_EPOCH, 0.0
    if resume:
        state = load_checkpoint(resume, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                scaler=scaler, ema=ema.module if ema is not None else None)
        if state['has_training_state']:
            start_epoch, max_accuracy = state['epoch'] + 1, state['max_accuracy']
        logger.info(f'resumed from {resume}: continuing at epoch {start_epoch}')
    if rank == 0:
        drop_metrics_from(metrics_path, start_epoch)

    ddp = wrap_ddp(model, device)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(out)
    step = OptimizerStep(ddp, model, optimizer, scaler, autocast, accumulation,
                         config.TRAIN.CLIP_GRAD)
    trainer = Trainer(config, ddp, model, build_criterion(config, loaders.mixup), optimizer, scheduler,
                      scaler, step, device, loaders.mixup, ema, writer)

    logger.info(f'training epochs {start_epoch} to {config.TRAIN.EPOCHS - 1}')
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        loaders.set_epoch(epoch)
        # Every random draw of the epoch (drop path, mixup, augmentation in this process) follows
        # from (seed, epoch, rank), so a resumed run repeats an uninterrupted one.
        seed_everything(derive_seed(config.SEED, epoch, rank))
        stats = train_one_epoch(trainer, loaders.train, epoch)
        val = validate(model, loaders.val, device, autocast)
        report_skipped((loaders.train, loaders.val), f'epoch {epoch}', out)
        max_accuracy = max(max_accuracy, val['acc1'])
        record = {'epoch': epoch, 'train_loss': stats['loss'], 'val_loss': val['loss'],
                  'acc1': val['acc1'], 'acc5': val['acc5'], 'lr': stats['lr'],
                  'epoch_time_s': stats['time_s'], 'max_accuracy': max_accuracy}
        if ema is not None:
            val_ema = validate(ema.module, loaders.val, device, autocast, name='EMA')
            record.update(acc1_ema=val_ema['acc1'], acc5_ema=val_ema['acc5'])
        logger.info(f'epoch {epoch}: acc1 {val["acc1"]:.2f}% (max {max_accuracy:.2f}%), '
                    f'train loss {stats["loss"]:.4f}, {stats["time_s"]:.0f}s')
        if rank == 0:
            append_metrics(metrics_path, record)
            for key in ('train_loss', 'val_loss', 'acc1', 'acc5'):
                writer.add_scalar(f'epoch/{key}', record[key], epoch)
            writer.flush()
            if epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
                path = save_checkpoint(checkpoint_path(out, epoch), model=model, optimizer=optimizer,
                                       lr_scheduler=scheduler, scaler=scaler, epoch=epoch,
                                       max_accuracy=max_accuracy, config=config,
                                       ema=ema.module if ema is not None else None,
                                       keep=config.SAVE_KEEP)
                logger.info(f'saved {path}')
    if writer is not None:
        writer.close()
    logger.info(f'done: max accuracy {max_accuracy:.2f}%')
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == '__main__':
    sys.exit(main())
