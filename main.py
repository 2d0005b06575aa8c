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
from engine import (OptimizerStep, Preemption, Progress, RunLock, amp_dtype, append_metrics,
                    check_same_config, drop_metrics_from, make_autocast, make_scaler, match_grad_layout,
                    memory_mb, run_cli, tensorboard_writer, wrap_ddp)
from engine.checkpoint import all_finite, checkpoint_path, save_checkpoint
from engine.config_merge import config_differences
from engine.folders import ensure_writable_dir
from engine.resume import find_resume_checkpoint, load_checkpoint
from engine.seed import derive_seed, rng_state, seed_everything, set_rng_state
from engine.weights import check_weights_path
from errors import UserError
from logger import NAME as LOGGER_NAME, create_logger
from lr_scheduler import build_scheduler
from models import build_model
from models.cost import count_flops, count_params
from optimizer import build_optimizer
from utils import (all_gather_objects, all_reduce_sum, get_rank, get_world_size, init_distributed,
                   is_distributed)

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
    preemption: Optional[Preemption] = None
    # save_position(epoch, steps done, steps per epoch, totals) writes a mid-epoch checkpoint
    save_position: Optional[Callable[[int, int, int, dict], str]] = None


def train_one_epoch(t: Trainer, loader, epoch: int, num_steps: int, resume: Optional[dict] = None) -> dict:
    """One epoch of ``num_steps`` micro-batches; ``resume``: the position of a mid-epoch checkpoint of
    this epoch (its steps done and running totals), the loader already set to start after them.
    After every optimizer step, a signal or a due periodic save writes the position reached."""
    cfg = t.config
    t.model.train()
    accumulation = t.optimizer_step.accumulation
    updates_per_epoch = math.ceil(num_steps / accumulation)
    first = resume['step'] if resume else 0
    totals = {k: resume[k] for k in ('loss_sum', 'norm_sum', 'updates')} if resume else \
        {'loss_sum': 0.0, 'norm_sum': 0.0, 'updates': 0}
    if first:  # the rate of the last step taken, as an uninterrupted run leaves it
        t.scheduler.step_update(epoch * updates_per_epoch + (first - 1) // accumulation)
    progress = Progress(num_steps, first)
    t.optimizer.zero_grad(set_to_none=True)
    for idx, (images, targets) in enumerate(loader, start=first):
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
            f'at epoch {epoch} step {idx}/{num_steps}; the newest checkpoint was written before it')
        if grad_norm is not None:
            if t.ema is not None:
                t.ema.update(t.module, step=step)
            totals['norm_sum'] += grad_norm.item()
            totals['updates'] += 1
        totals['loss_sum'] += loss_value
        tick = progress.tick(idx)
        if idx % cfg.PRINT_FREQ == 0 or idx + 1 == num_steps:
            lr = t.optimizer.param_groups[0]['lr']
            grad_norm = t.optimizer_step.grad_norm.item()
            logger.info(f'Train: [{epoch}/{cfg.TRAIN.EPOCHS}][{idx}/{num_steps}]  '
                        f'eta {tick["eta"]}  lr {lr:.6e}  time {tick["time"]:.3f}  '
                        f'loss {loss_value:.4f} ({totals["loss_sum"] / (idx + 1):.4f})  '
                        f'grad_norm {grad_norm:.4f}{memory_mb(t.device)}')
            if t.writer is not None:
                global_step = epoch * num_steps + idx
                t.writer.add_scalar('train/loss', loss_value, global_step)
                t.writer.add_scalar('train/lr', lr, global_step)
                t.writer.add_scalar('train/grad_norm', grad_norm, global_step)
        if t.optimizer_step.ends_step(idx, num_steps) and t.preemption is not None:
            stop, save = t.preemption.poll()  # the same answer on every process
            path = t.save_position(epoch, idx + 1, num_steps, totals) if save else None
            if stop:
                raise t.preemption.stopped(f'at epoch {epoch} step {idx + 1}/{num_steps}', path)
    return {'loss': totals['loss_sum'] / num_steps, 'grad_norm': totals['norm_sum'] / max(1, totals['updates']),
            'lr': t.optimizer.param_groups[0]['lr'], 'time_s': time.time() - progress.start}


class NoValidationImages(UserError):
    """Every validation image was skipped: an accuracy of 0% would be a lie."""


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
    if n == 0:  # every image was unreadable and skipped: there is no accuracy to report
        example = next(iter(getattr(loader, 'skipped', {}).items()), None)
        shown = f', for example {example[0]}: {example[1]}' if example else ''
        raise NoValidationImages(f'no validation image could be read: all were skipped as unreadable{shown}')
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
    check_same_config(config)
    out = output_dir(config)
    if config.EVAL_MODE or config.THROUGHPUT_MODE:  # they write no checkpoints: no lock to hold
        ensure_writable_dir(out)
        return run_in(config, device, out)
    # One training run per output folder: taken before anything is written there.
    with RunLock(out) as lock:
        ensure_writable_dir(out)
        return run_in(config, device, out, lock.note)


def run_in(config, device: torch.device, out: str, note: str = '') -> int:
    rank = get_rank()
    create_logger(out, rank)
    if note:
        logger.warning(note)
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
            state = load_checkpoint(config.MODEL.RESUME, model=model)
            trained = f' (trained {state["epoch"] + 1} epochs)' if state['epoch'] >= 0 else ''
            logger.info(f'evaluating {config.MODEL.RESUME}{trained}')
        elif config.MODEL.PRETRAINED:
            load_weights(config, model, fine_tune=False)
            logger.info(f'evaluating {config.MODEL.PRETRAINED}')
        else:
            raise UserError('--eval needs the weights to evaluate: --resume <checkpoint> or --pretrained <file>')
        result = validate(model, loaders.val, device, autocast)
        report_skipped((loaders.val,), 'evaluation', out)
        logger.info(f'{config.MODEL.RESUME or config.MODEL.PRETRAINED}: top-1 {result["acc1"]:.3f}% '
                    f'on {result["images"]} images')
        if rank == 0:
            append_metrics(metrics_path, {'mode': 'eval', 'checkpoint': config.MODEL.RESUME or config.MODEL.PRETRAINED,
                                          'val_loss': result['loss'], 'acc1': result['acc1'],
                                          'acc5': result['acc5'], 'images': result['images']})
        return 0

    return train(config, loaders, model, device, autocast, dtype, out, metrics_path)


def _log_config_changes(saved, config, path: str):
    """The current config governs a resumed run; say which keys differ from the checkpoint's."""
    if not isinstance(saved, str):  # an official checkpoint's pickled config: not compared
        return
    changed = [f'{k} {a!r} -> {b!r}' for k, a, b in config_differences(saved, config)
               if k not in ('MODEL.RESUME', 'TRAIN.AUTO_RESUME')]
    if changed:
        logger.info(f'the config differs from that of {path} in {len(changed)} key(s); the current '
                    f'values govern: ' + '; '.join(changed))


def _batch_layout(config, loaders) -> dict:
    """What a mid-epoch position depends on: the same steps must hold the same samples."""
    return {'batch_size': config.DATA.BATCH_SIZE, 'world_size': get_world_size(),
            'accumulation': max(1, config.TRAIN.ACCUMULATION_STEPS),
            'train_images': len(loaders.train.dataset)}


def _usable_position(position, config, loaders, path: str) -> Optional[dict]:
    """The mid-epoch position of a checkpoint, or None (with a warning) when this run splits the
    epoch differently, so that its steps are not the checkpoint's."""
    if position is None:
        return None
    now = _batch_layout(config, loaders)
    if position['layout'] != now or position['steps_per_epoch'] != loaders.steps_per_epoch:
        logger.warning(f'{path} was saved after step {position["step"]} of epoch {position["epoch"]} with '
                       f'{position["layout"]}; this run has {now}, so its steps hold other samples: '
                       f'epoch {position["epoch"]} starts again from its first step')
        return None
    return position


def _left_to_train(path: str, start_epoch: int, position: Optional[dict], config) -> bool:
    """Whether a run resumed from ``path`` at ``start_epoch`` has anything left to train; a checkpoint
    beyond TRAIN.EPOCHS is a mistake, not a finished run."""
    if start_epoch > config.TRAIN.EPOCHS:
        raise UserError(f'{path} has trained {start_epoch} epochs, more than TRAIN.EPOCHS '
                        f'{config.TRAIN.EPOCHS}; raise TRAIN.EPOCHS to continue it, or give a new '
                        f'run another --output or --tag')
    if start_epoch == config.TRAIN.EPOCHS and position is None:
        logger.info(f'the run is already complete: {path} ends epoch {start_epoch - 1}, the last '
                    f'of TRAIN.EPOCHS {config.TRAIN.EPOCHS}; nothing to train (raise TRAIN.EPOCHS '
                    f'to train longer)')
        return False
    return True


def train(config, loaders, model, device, autocast, dtype, out, metrics_path) -> int:
    rank = get_rank()
    resume, ckpt = config.MODEL.RESUME, None
    if config.TRAIN.AUTO_RESUME:
        found = find_resume_checkpoint(out)
        if found:
            if resume and os.path.abspath(resume) != os.path.abspath(found[0]):
                logger.warning(f'auto-resume: using {found[0]} instead of {resume}')
            resume, ckpt = found
    if config.MODEL.PRETRAINED and not resume:
        load_weights(config, model, fine_tune=True)
    scale = lr_scale(config, get_world_size())
    optimizer = build_optimizer(config, model, scale)
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    steps_per_epoch = loaders.steps_per_epoch
    scheduler = build_scheduler(config, optimizer, math.ceil(steps_per_epoch / accumulation), scale)
    scaler = make_scaler(device, dtype)
    ema = None
    if config.TRAIN.EMA.ENABLED:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY)
    logger.info(f'learning rate {config.TRAIN.BASE_LR * scale:.3e} (BASE_LR x {scale:g}: '
                f'global batch {config.DATA.BATCH_SIZE * get_world_size() * accumulation} / 512)')

    start_epoch, max_accuracy, position = config.TRAIN.START_EPOCH, 0.0, None
    if resume:
        state = load_checkpoint(resume, model=model, optimizer=optimizer, scaler=scaler,
                                ema=ema.module if ema is not None else None, ckpt=ckpt)
        _log_config_changes(state['config'], config, resume)
        if state['has_training_state']:
            start_epoch, max_accuracy = state['epoch'] + 1, state['max_accuracy']
            position = _usable_position(state['entries'].get('position'), config, loaders, resume)
        if not _left_to_train(resume, start_epoch, position, config):
            return 0
        where = f' step {position["step"]}/{steps_per_epoch}' if position else ''
        logger.info(f'resumed from {resume}: continuing at epoch {start_epoch}{where}')
    if rank == 0:
        drop_metrics_from(metrics_path, start_epoch)

    ddp = wrap_ddp(model, device)
    writer = tensorboard_writer(out)
    step = OptimizerStep(ddp, model, optimizer, scaler, autocast, accumulation,
                         config.TRAIN.CLIP_GRAD)

    def save(epoch: int, position: Optional[dict] = None) -> Optional[str]:
        """A checkpoint after ``epoch`` (rank 0 writes it), or part-way through epoch ``epoch`` + 1."""
        path = None
        if rank == 0:
            path = save_checkpoint(
                checkpoint_path(out, epoch + 1, step=position['step']) if position else checkpoint_path(out, epoch),
                model=model, optimizer=optimizer, lr_scheduler=scheduler, scaler=scaler, epoch=epoch,
                max_accuracy=max_accuracy, config=config, ema=ema.module if ema is not None else None,
                keep=config.SAVE_KEEP, extra={'position': position} if position else None)
            logger.info(f'saved {path}')
        all_reduce_sum(torch.zeros(1, device=device))  # no process leaves before the file is complete
        preemption.saved()
        return path

    def save_position(epoch: int, done: int, num_steps: int, totals: dict) -> Optional[str]:
        report_skipped((loaders.train,), f'epoch {epoch} (to step {done})', out)
        position = dict(totals, epoch=epoch, step=done, steps_per_epoch=num_steps,
                        layout=_batch_layout(config, loaders),
                        rng=all_gather_objects(rng_state()))  # every process's generators
        return save(epoch - 1, position)

    logger.info(f'training epochs {start_epoch} to {config.TRAIN.EPOCHS - 1}')
    with Preemption(device, config.SAVE_MINUTES) as preemption:
        trainer = Trainer(config, ddp, model, build_criterion(config, loaders.mixup), optimizer,
                          scheduler, scaler, step, device, loaders.mixup, ema, writer, preemption,
                          save_position)
        for epoch in range(start_epoch, config.TRAIN.EPOCHS):
            resumed = position if position is not None and position['epoch'] == epoch else None
            loaders.set_epoch(epoch, resumed['step'] if resumed else 0)
            if resumed:  # the generators as the interrupted run left them, in every process
                set_rng_state(resumed['rng'][rank])
            else:
                # Every random draw of the epoch in this process (drop path, mixup) follows from
                # (seed, epoch, rank), and each sample's augmentation from its position
                # (data/sampler.py), so a resumed run repeats an uninterrupted one.
                seed_everything(derive_seed(config.SEED, epoch, rank))
            stats = train_one_epoch(trainer, loaders.train, epoch, steps_per_epoch, resumed)
            try:
                val = validate(model, loaders.val, device, autocast)
            except NoValidationImages:
                save(epoch)  # the epoch's training is kept; the run stops for the data to be fixed
                raise
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
            # A signal during validation stops here, with this epoch saved whatever SAVE_FREQ says.
            stop, _ = preemption.poll()
            path = None
            if stop or epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
                path = save(epoch)
            if stop:
                raise preemption.stopped(f'after epoch {epoch}', path)
    if writer is not None:
        writer.close()
    logger.info(f'done: max accuracy {max_accuracy:.2f}%')
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == '__main__':
    sys.exit(main())
