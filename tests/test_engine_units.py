"""Each engine/ piece on its own, without a training run: the optimizer step, the output-folder lock,
pre-emption, the resume lookup, the checkpoint checks, progress and the run start."""
import os
import signal
import time
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn

from config import load_config
from errors import TrainingStopped, UserError


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------- the optimizer step

def test_two_accumulated_micro_batches_make_the_step_of_their_whole_batch():
    from engine import OptimizerStep
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    # The reference: a bare optimizer stepping on the whole batch, gradients clipped to norm 0.1.
    reference = _linear()
    bare = torch.optim.SGD(reference.parameters(), lr=0.5)
    nn.functional.cross_entropy(reference(x), y).backward()
    nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    bare.step()

    model = _linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    step = OptimizerStep(model, model, optimizer, torch.amp.GradScaler('cpu', enabled=False), nullcontext,
                         accumulation=2, clip_grad=0.1)
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    results = [step(lambda: nn.functional.cross_entropy(model(a), b), i, 2, 'at test')
               for i, (a, b) in enumerate(halves)]
    assert results[0][1] is None and results[1][1] is not None  # the update comes with the last micro-batch
    for name, value in model.state_dict().items():
        assert torch.allclose(value, reference.state_dict()[name], atol=1e-6), name
    assert step.ends_step(1, 2) and not step.ends_step(0, 2)


def test_a_non_finite_loss_stops_before_any_update():
    from engine import OptimizerStep
    model = _linear()
    before = _state(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    step = OptimizerStep(model, model, optimizer, torch.amp.GradScaler('cpu', enabled=False), nullcontext)
    with pytest.raises(TrainingStopped, match='the loss is nan at epoch 2 step 5'):
        step(lambda: model(torch.randn(2, 4)).sum() * float('nan'), 0, 1, 'at epoch 2 step 5')
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_step_calls_while_busy_once_after_the_backward_pass_and_before_the_update():
    from engine import OptimizerStep
    model = _linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    step = OptimizerStep(model, model, optimizer, torch.amp.GradScaler('cpu', enabled=False), nullcontext)
    events = []

    def loss():
        events.append('forward')
        return model(torch.randn(2, 4)).sum()

    before = _state(model)

    def busy():
        events.append(('busy', model.weight.grad is not None, torch.equal(model.weight, before['weight'])))
    step(loss, 0, 1, 'at test', while_busy=busy)
    assert events == ['forward', ('busy', True, True)]  # gradients there, the weights not yet updated
    assert not torch.equal(model.weight, before['weight'])


# ---------------------------------------------------------------------------------- batches one step ahead

class _Loader:
    """Batches (images, targets) numbered 0.., failing on the batches in ``fail``; counts fetches."""

    def __init__(self, count: int, fail=()):
        self.count, self.fail, self.fetched = count, set(fail), 0

    def __iter__(self):
        for i in range(self.count):
            self.fetched += 1
            if i in self.fail:
                raise UserError(f'batch {i} is damaged')
            yield torch.full((2, 3), float(i)), torch.tensor([i, i])


def test_batches_one_step_ahead_are_the_loaders_in_order_on_the_device():
    from engine.ahead import DeviceBatches
    loader = _Loader(3)
    batches = DeviceBatches(loader, torch.device('cpu'))
    seen = []
    for images, targets in batches:
        seen.append(int(targets[0]))
        assert images.device.type == 'cpu' and float(images[0, 0]) == seen[-1]
        batches.prepare_next()
        batches.prepare_next()  # a second call in the same step fetches nothing more
        assert loader.fetched == min(len(seen) + 1, 3)
    assert seen == [0, 1, 2]


def test_an_error_fetching_the_next_batch_early_comes_when_that_batch_is_asked_for():
    from engine.ahead import DeviceBatches
    batches = DeviceBatches(_Loader(4, fail={2}), torch.device('cpu'))
    assert int(next(batches)[1][0]) == 0
    assert int(next(batches)[1][0]) == 1
    batches.prepare_next()  # during step 1: batch 2 fails, but step 1 goes on
    with pytest.raises(UserError, match='batch 2 is damaged'):
        next(batches)


# ---------------------------------------------------------------------------------- the lock

def test_the_lock_refuses_a_second_holder_and_is_gone_after_the_run(tmp_path):
    from engine import FolderInUse, RunLock
    folder = tmp_path / 'run'
    with RunLock(str(folder)):
        assert (folder / 'run.lock').is_file()
        with pytest.raises(FolderInUse, match=f'the output folder {folder} is in use by another run'):
            RunLock(str(folder)).__enter__()
        assert (folder / 'run.lock').is_file()  # the refused one took nothing away
    assert not (folder / 'run.lock').exists()


def test_start_run_locks_a_training_folder_but_not_an_evaluation(tmp_path):
    from engine import FolderInUse
    from engine.run import start_run
    from logger import close_logger
    config = load_config(None, ['OUTPUT', str(tmp_path), 'TAG', 't'])
    out = tmp_path / config.MODEL.NAME / 't'
    with start_run(config, training=True) as started:
        assert started.out == str(out) and started.rank == 0 and (out / 'run.lock').is_file()
        with pytest.raises(FolderInUse):
            with start_run(config, training=True):
                pass
        with start_run(config, training=False):  # an evaluation beside a training run is fine
            pass
    assert not (out / 'run.lock').exists() and (out / 'log_rank0.txt').is_file()
    close_logger()  # as run_cli does at the end of a run


# ---------------------------------------------------------------------------------- pre-emption

def test_a_signal_asks_every_poll_to_stop_and_save_and_the_handlers_are_put_back():
    from engine import Preemption
    before = signal.getsignal(signal.SIGTERM)
    with Preemption() as preemption:
        assert preemption.poll() == (False, False)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.poll() == (True, True)
        assert preemption.exit_code == 143
        stopped = preemption.stopped('at epoch 1 step 3/9', '/out/ckpt.pth')
        assert str(stopped) == ('stopped by SIGTERM at epoch 1 step 3/9; saved /out/ckpt.pth; run the same '
                                'command to continue from there') and stopped.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_periodic_save_is_due_by_the_clock_and_restarts_after_a_save():
    from engine import Preemption
    with Preemption(save_minutes=0.5 / 60) as preemption:  # every half second
        assert preemption.poll() == (False, False)
        time.sleep(0.6)
        assert preemption.poll() == (False, True)
        preemption.saved()
        assert preemption.poll() == (False, False)


# ---------------------------------------------------------------------------------- progress

def test_progress_lines_come_every_print_freq_steps_and_by_the_clock():
    from engine import Progress
    quiet = Progress(100, every_s=3600)
    assert [i for i in range(100) if quiet.due(i, print_freq=40)] == [0, 40, 80, 99]
    chatty = Progress(100, first=10, every_s=0.0)
    assert all(chatty.due(i, print_freq=40) for i in range(10, 100))
    tick = Progress(10).tick(4)
    assert set(tick) == {'time', 'eta', 'elapsed'}


# ---------------------------------------------------------------------------------- checkpoints and resume

def _save(path, model, optimizer, epoch, **extra):
    from engine.checkpoint import save_checkpoint
    return save_checkpoint(str(path), model=model, optimizer=optimizer,
                           lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1),
                           scaler=torch.amp.GradScaler('cpu', enabled=False), epoch=epoch, best_score=12.5,
                           config=load_config(), extra=extra or None)


def _trained(seed: int):
    model = _linear(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_resume_or_load_finds_checks_loads_and_says_where_to_start(tmp_path):
    from engine.resume import resume_or_load
    model, optimizer = _trained(1)
    _save(tmp_path / 'ckpt_epoch_4.pth', model, optimizer, 4)
    config = load_config(None, ['TRAIN.EPOCHS', '10'])
    fresh = _linear(2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    called = []
    resumed = resume_or_load(config, str(tmp_path), model=fresh, optimizer=fresh_optimizer,
                             load_weights=lambda: called.append(1))
    assert resumed.path == str(tmp_path / 'ckpt_epoch_4.pth') and resumed.start == 5
    assert resumed.best_score == 12.5 and resumed.has_training_state and not called
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert torch.equal(fresh_optimizer.state_dict()['state'][0]['exp_avg'],
                       optimizer.state_dict()['state'][0]['exp_avg'])
    # Nothing to resume: the released weights are loaded instead, and the run starts at its first epoch.
    empty = tmp_path / 'empty'
    empty.mkdir()
    config = load_config(None, ['TRAIN.EPOCHS', '10', 'MODEL.PRETRAINED', 'weights.pth'])
    resumed = resume_or_load(config, str(empty), model=fresh, optimizer=fresh_optimizer,
                             load_weights=lambda: called.append(1))
    assert resumed.path is None and resumed.start == 0 and called == [1]


def test_an_old_checkpoint_that_calls_the_best_score_max_accuracy_still_resumes(tmp_path):
    from engine.resume import load_checkpoint
    model, optimizer = _trained(1)
    path = _save(tmp_path / 'ckpt_epoch_0.pth', model, optimizer, 0)
    old = torch.load(path, weights_only=True)
    old['max_accuracy'] = old.pop('best_score')
    torch.save(old, path)
    state = load_checkpoint(path, model=_linear(), optimizer=torch.optim.AdamW(_linear().parameters()))
    assert state['best_score'] == 12.5


@pytest.mark.parametrize('shape, message', [
    # A stride-0 view of 10^6 x 10^6 floats over 10^6 stored ones: a 4 MB file claiming 4 TB.
    ((10 ** 6, 10 ** 6), 'has shape [1000000, 1000000] (1e+12 elements, more than the 2.15e+09 any model here holds)'),
    ((1000, 1000), 'has shape [1000, 1000] (4000000 bytes) but its storage holds 4000 bytes'),
])
def test_a_tensor_larger_than_its_storage_is_refused_before_it_is_read(tmp_path, shape, message):
    from engine.checkpoint_checks import CheckpointEntryError
    from engine.resume import load_checkpoint
    model, optimizer = _trained(1)
    path = _save(tmp_path / 'ckpt_epoch_0.pth', model, optimizer, 0)
    ckpt = torch.load(path, weights_only=True)
    ckpt['model']['weight'] = torch.zeros(1, shape[1]).expand(*shape)
    torch.save(ckpt, path)
    assert os.path.getsize(path) < 5e6
    with pytest.raises(CheckpointEntryError) as info:
        load_checkpoint(str(path), model=_linear())
    assert str(info.value) == f'{path}: "model" entry weight {message}' + (
        '; refusing it' if 'elements' in message else ' (an expanded or overlapping view, not data); refusing it')


def test_an_optimizer_state_of_another_shape_is_refused_and_auto_resume_passes_over_it(tmp_path, caplog):
    import logging
    from engine.checkpoint_checks import CheckpointEntryError
    from engine.resume import load_checkpoint, resume_or_load
    model, optimizer = _trained(1)
    _save(tmp_path / 'ckpt_epoch_0.pth', model, optimizer, 0)
    bad = _save(tmp_path / 'ckpt_epoch_1.pth', model, optimizer, 1)
    ckpt = torch.load(bad, weights_only=True)
    ckpt['optimizer']['state'][0]['exp_avg'] = torch.zeros(3, 5)  # the weight is [3, 4]
    torch.save(ckpt, bad)
    fresh = _linear(2)
    before = _state(fresh)
    with pytest.raises(CheckpointEntryError) as info:
        load_checkpoint(bad, model=fresh, optimizer=torch.optim.AdamW(fresh.parameters()))
    assert str(info.value) == (f'{bad}: the "optimizer" entry\'s exp_avg of parameter 0 has shape [3, 5]; '
                               f'the parameter has [3, 4]')
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing was loaded
    config = load_config(None, ['TRAIN.EPOCHS', '10'])
    with caplog.at_level(logging.WARNING, logger='focalnet'):
        resumed = resume_or_load(config, str(tmp_path), model=fresh,
                                 optimizer=torch.optim.AdamW(fresh.parameters()))
    assert resumed.path == str(tmp_path / 'ckpt_epoch_0.pth') and resumed.start == 1
    assert any(f'auto-resume: passing over {bad}' in r.getMessage() for r in caplog.records)


def test_a_mid_epoch_save_records_its_position_and_passes_the_checks(tmp_path):
    from engine.checkpoint_checks import check_checkpoint
    from engine.epochs import EpochCheckpoints, batch_layout
    config = load_config(None, ['TRAIN.EPOCHS', '10'])
    model, optimizer = _trained(1)
    checkpoints = EpochCheckpoints(str(tmp_path), torch.device('cpu'), batch_layout(config, 100), best_score=7.0,
                                   model=model, optimizer=optimizer,
                                   lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1),
                                   scaler=torch.amp.GradScaler('cpu', enabled=False), config=config)
    totals = {'loss_sum': 3.5, 'norm_sum': 1.25, 'updates': 3}
    path = checkpoints.save_position(2, 3, 12, totals)
    assert path == str(tmp_path / 'ckpt_epoch_2_step_3.pth')
    ckpt = torch.load(path, weights_only=True)
    check_checkpoint(ckpt, path, training=True)
    assert ckpt['epoch'] == 1 and ckpt['best_score'] == 7.0
    assert ckpt['position']['step'] == 3 and ckpt['position']['loss_sum'] == 3.5
    # The end of the epoch replaces the mid-epoch checkpoint.
    checkpoints.best_score = 8.0
    assert checkpoints.save(2) == str(tmp_path / 'ckpt_epoch_2.pth')
    assert torch.load(tmp_path / 'ckpt_epoch_2.pth', weights_only=True)['best_score'] == 8.0
    assert sorted(p.name for p in tmp_path.glob('ckpt_*')) == ['ckpt_epoch_2.pth']


def test_user_error_for_a_missing_config_file_of_a_dense_task():
    import argparse
    from config import get_config
    args = argparse.Namespace(cfg=None, opts=None, eval=False, resume=None)
    with pytest.raises(UserError, match=r'--cfg <config file> is needed \(only --eval --resume'):
        get_config(args, require_cfg=True)


# ---------------------------------------------------------------------------------- evaluating a checkpoint

def test_eval_of_a_training_checkpoint_takes_its_stored_config_and_says_what_the_command_changed(tmp_path, caplog):
    import argparse
    import logging
    from config import get_config
    from engine.run import record_config
    trained = load_config(None, ['MODEL.FOCAL.EMBED_DIM', '16', 'MODEL.FOCAL.DEPTHS', '[1, 1, 1, 1]',
                                 'DATA.IMG_SIZE', '64', 'MODEL.NUM_CLASSES', '7'])
    model, optimizer = _trained(1)
    from engine.checkpoint import save_checkpoint
    path = str(tmp_path / 'ckpt_epoch_3.pth')
    save_checkpoint(path, model=model, optimizer=optimizer, lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1),
                    scaler=torch.amp.GradScaler('cpu', enabled=False), epoch=3, best_score=1.0, config=trained)
    args = argparse.Namespace(cfg=None, opts=['DATA.BATCH_SIZE', '8'], eval=True, resume=path, output=str(tmp_path))
    config = get_config(args)
    # The model is the one trained, whatever the defaults say; what the command names wins.
    assert config.MODEL.FOCAL.EMBED_DIM == 16 and list(config.MODEL.FOCAL.DEPTHS) == [1, 1, 1, 1]
    assert config.MODEL.NUM_CLASSES == 7 and config.DATA.IMG_SIZE == 64
    assert config.DATA.BATCH_SIZE == 8 and config.EVAL_MODE and config.MODEL.RESUME == path
    # The same without --eval: a training run takes the config it is given.
    assert get_config(argparse.Namespace(cfg=None, opts=None, eval=False, resume=path)).MODEL.FOCAL.EMBED_DIM == 96
    out = tmp_path / 'eval'
    out.mkdir()
    with caplog.at_level(logging.INFO, logger='focalnet'):
        record_config(config, str(out))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # Where the evaluation writes is its own (OUTPUT, TAG), not the training run's: not a difference.
    assert warned == [f'evaluating with 1 key(s) other than {path} was trained with: DATA.BATCH_SIZE 128 -> 8']
    assert config.OUTPUT == str(tmp_path)
    assert (out / 'config_eval.yaml').read_text() == config.dump()
    # The console line is a summary; the whole config goes to the log file only.
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith('config: ')]
    assert summary and 'MODEL.FOCAL.EMBED_DIM=16' in summary[0] and '\n' not in summary[0]
    full = [r for r in caplog.records if r.getMessage().startswith('config:\n')]
    assert full and getattr(full[0], 'file_only', False)


def test_a_stored_config_with_keys_this_version_lacks_still_evaluates(tmp_path, caplog):
    import logging
    from config import load_config as load
    import yaml
    stored = yaml.safe_load(load_config().dump())
    stored['TRAIN']['RETIRED_KEY'] = 3
    stored['DETECTION']['BASE_BATCH'] = 8  # as a checkpoint written before the key was renamed
    del stored['TRAIN']['BASE_BATCH_SIZE']
    text = yaml.safe_dump(stored)
    with caplog.at_level(logging.WARNING, logger='focalnet'):
        config = load(None, stored=(text, 'the config stored in x.pth'))
    assert config.TRAIN.BASE_BATCH_SIZE == 8  # the old name of the key, read into the new one
    messages = [r.getMessage() for r in caplog.records]
    assert any("left out 1 key(s) this version does not know: TRAIN.RETIRED_KEY" in m for m in messages)
    assert any('DETECTION.BASE_BATCH in the config stored in x.pth is deprecated' in m for m in messages)
