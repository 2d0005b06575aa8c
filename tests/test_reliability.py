"""A run survives kills, bad data and hostile files: resume, atomic checkpoints, damaged images,
divergence, code-carrying pickles, user mistakes and a failing rank. CPU, tiny models, real files."""
import logging
import re
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from data.robust import (CorruptImageError, DataError, RobustImageFolder, SkipReportingLoader,
                         collate_with_problems)
from tiny_runs import (STEPS_PER_EPOCH, assert_same_final_state, call_main, free_port, load,
                       main_args, make_image_folder, run_dir, run_main)


def damage(root: Path):
    """Truncate one image and replace another with random bytes; returns their paths."""
    truncated, garbage = root / 'a' / '1.png', root / 'b' / '3.png'
    data = truncated.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return str(truncated), str(garbage)


def robust_loader(root, skip, refill=True, num_workers=1, batch_size=4):
    ds = RobustImageFolder(str(root), transforms.ToTensor(), skip_corrupt=skip, refill=refill)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=True,
                        collate_fn=collate_with_problems)
    return SkipReportingLoader(loader, skip)


# ---------------------------------------------------------------------------------- damaged images

def test_corrupt_image_stops_naming_the_file(tmp_path):
    bad = damage(make_image_folder(tmp_path))
    with pytest.raises(CorruptImageError) as info:
        for _ in robust_loader(tmp_path, skip=False):
            pass
    assert info.value.path in bad
    assert info.value.path in str(info.value) and 'DATA.SKIP_CORRUPT' in str(info.value)


@pytest.mark.parametrize('num_workers', [0, 2])
def test_skip_mode_refills_batches_and_reports_every_skipped_file(tmp_path, num_workers):
    truncated, garbage = damage(make_image_folder(tmp_path))
    loader = robust_loader(tmp_path, skip=True, num_workers=num_workers)
    sizes = [len(x) for x, _ in loader]
    assert sizes == [4, 4, 4]  # every batch keeps its size: the next readable image fills the slot
    reasons = dict(loader.take_skipped())
    assert set(reasons) == {truncated, garbage}
    assert 'truncated' in reasons[truncated]
    assert loader.take_skipped() == []  # reported once per occurrence
    next(iter(loader)), list(loader)
    assert set(loader.skipped) == {truncated, garbage}


def test_skip_mode_without_refill_drops_the_samples(tmp_path):
    damage(make_image_folder(tmp_path))
    loader = robust_loader(tmp_path, skip=True, refill=False, batch_size=5)
    assert sum(len(x) for x, _ in loader) == 10
    assert len(loader.take_skipped()) == 2


def test_truncated_images_are_not_padded_silently(tmp_path):
    from PIL import ImageFile
    truncated, _ = damage(make_image_folder(tmp_path))
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as some libraries set it
    try:
        ds = RobustImageFolder(str(tmp_path), skip_corrupt=False)
        index = [p for p, _ in ds.samples].index(truncated)
        with pytest.raises(CorruptImageError, match='truncated'):
            ds[index]
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_validation_class_unknown_to_training_set(tmp_path):
    train = make_image_folder(tmp_path / 'train', classes=('a', 'b', 'c'), per_class=1)
    val = make_image_folder(tmp_path / 'val', classes=('b', 'zebra'), per_class=1)
    train_ds = RobustImageFolder(str(train))
    with pytest.raises(DataError, match='zebra'):
        RobustImageFolder(str(val), class_to_idx=train_ds.class_to_idx)
    # A validation folder with a subset of the classes keeps the training indices.
    (val / 'zebra' / '0.png').unlink()
    (val / 'zebra').rmdir()
    val_ds = RobustImageFolder(str(val), class_to_idx=train_ds.class_to_idx)
    assert val_ds.targets == [train_ds.class_to_idx['b']]


def test_missing_or_empty_data_folder(tmp_path):
    with pytest.raises(DataError, match='not found'):
        RobustImageFolder(str(tmp_path / 'nope'))
    with pytest.raises(DataError, match='no class folders'):
        RobustImageFolder(str(tmp_path))


# ------------------------------------------------------------------------------------ whole runs

def test_kill_and_resume_ends_with_the_weights_of_an_uninterrupted_run(tiny_cfg, tiny_data, tmp_path,
                                                                       uninterrupted):
    args = main_args(tiny_cfg, tiny_data, tmp_path)
    killed = run_main(args, fault=f'kill@step={STEPS_PER_EPOCH + 1}')  # epoch 1, step 1
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in run_dir(tmp_path).glob('ckpt_*')) == ['ckpt_epoch_0.pth']
    resumed = run_main(args)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resumed from' in resumed.stdout and 'ckpt_epoch_0.pth' in resumed.stdout
    assert_same_final_state(run_dir(tmp_path) / 'ckpt_epoch_1.pth', uninterrupted)


def test_kill_during_a_save_leaves_the_previous_checkpoint(tiny_cfg, tiny_data, tmp_path, uninterrupted):
    args = main_args(tiny_cfg, tiny_data, tmp_path)
    killed = run_main(args, fault='kill@save=1')  # the epoch 1 file is written, not yet renamed
    assert killed.returncode == -signal.SIGKILL
    folder = run_dir(tmp_path)
    assert [p.name for p in folder.glob('ckpt_*')] == ['ckpt_epoch_0.pth']
    assert len(list(folder.glob('.ckpt_epoch_1.pth.*.tmp'))) == 1  # the kill did hit the save
    resumed = run_main(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'ckpt_epoch_0.pth: continuing at epoch 1' in resumed.stdout
    assert not list(folder.glob('.*.tmp'))  # the dead save's temporary file is cleaned up
    assert_same_final_state(folder / 'ckpt_epoch_1.pth', uninterrupted)


class _CreatesFile:
    """Unpickling this calls open(path, 'w'): a stand-in for code planted in a checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, 'w')


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({'model': {}, 'epoch': 99, 'payload': _CreatesFile(marker)}, path)
    return path


def test_auto_resume_passes_over_damaged_and_hostile_files(tmp_path, uninterrupted, caplog):
    from engine.resume import auto_resume_file
    good = tmp_path / 'ckpt_epoch_1.pth'
    shutil.copy(uninterrupted, good)
    data = good.read_bytes()
    (tmp_path / 'ckpt_epoch_2.pth').write_bytes(data[:len(data) // 2])  # truncated
    (tmp_path / 'ckpt_epoch_3.pth').write_bytes(b'')
    marker = tmp_path / 'pwned'
    hostile_checkpoint(tmp_path / 'ckpt_epoch_4.pth', marker)
    with caplog.at_level(logging.WARNING, logger='focalnet'):
        assert auto_resume_file(str(tmp_path)) == str(good)
    warned = '\n'.join(r.getMessage() for r in caplog.records)
    for n in (2, 3, 4):
        assert f'ckpt_epoch_{n}.pth' in warned
    assert 'io.open' in warned  # names what the hostile file holds
    assert not marker.exists()


def test_retention_keeps_the_newest_checkpoints(tmp_path):
    from config import load_config
    from engine.checkpoint import save_checkpoint
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    (tmp_path / 'ckpt_epoch_9.pth').write_bytes(b'left by another run')
    for epoch in range(4):
        save_checkpoint(str(tmp_path / f'ckpt_epoch_{epoch}.pth'), model=model, optimizer=optimizer,
                        lr_scheduler=scheduler, scaler=scaler, epoch=epoch, best_score=0.0,
                        config=load_config(), keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ['ckpt_epoch_2.pth', 'ckpt_epoch_3.pth', 'ckpt_epoch_9.pth']
    # keep=1 never deletes the newest complete file, even beside a newer-numbered damaged one.
    save_checkpoint(str(tmp_path / 'ckpt_epoch_4.pth'), model=model, optimizer=optimizer,
                    lr_scheduler=scheduler, scaler=scaler, epoch=4, best_score=0.0,
                    config=load_config(), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt_epoch_4.pth', 'ckpt_epoch_9.pth']
    assert load(tmp_path / 'ckpt_epoch_4.pth')['epoch'] == 4


def test_a_full_disk_during_a_save_stops_cleanly_and_keeps_the_previous_file(tmp_path, monkeypatch):
    import engine.checkpoint as checkpoint
    from config import load_config
    from engine.resume import auto_resume_file
    from errors import TrainingStopped
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = dict(model=model, optimizer=optimizer,
                  lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1),
                  scaler=torch.amp.GradScaler('cpu', enabled=False), best_score=0.0, config=load_config())
    checkpoint.save_checkpoint(str(tmp_path / 'ckpt_epoch_0.pth'), epoch=0, **kwargs)

    def half_then_full(obj, f):
        f.write(b'PK\x03\x04' + bytes(1000))
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(checkpoint.torch, 'save', half_then_full)
    with pytest.raises(TrainingStopped, match='no space left on the device of '):
        checkpoint.save_checkpoint(str(tmp_path / 'ckpt_epoch_1.pth'), epoch=1, keep=1, **kwargs)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt_epoch_0.pth']
    assert auto_resume_file(str(tmp_path)) == str(tmp_path / 'ckpt_epoch_0.pth')


def test_non_finite_weights_are_never_saved(tmp_path):
    from config import load_config
    from errors import TrainingStopped
    from engine.checkpoint import save_checkpoint
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.bias[0] = float('nan')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainingStopped, match='bias'):
        save_checkpoint(str(tmp_path / 'ckpt_epoch_0.pth'), model=model, optimizer=optimizer,
                        lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1),
                        scaler=torch.amp.GradScaler('cpu', enabled=False), epoch=0,
                        best_score=0.0, config=load_config())
    assert not list(tmp_path.iterdir())


def test_float16_overflow_is_skipped_unless_persistent_and_non_finite_gradients_stop():
    from errors import TrainingStopped
    from engine import check_update
    model = torch.nn.Linear(4, 1)
    # float32 without a scaler: a non-finite gradient norm stops before the update.
    off = torch.amp.GradScaler('cpu', enabled=False)
    check_update(off, torch.tensor(3.0), 'at epoch 0 step 1/4')
    with pytest.raises(TrainingStopped, match='gradient norm is nan at epoch 2 step 1/4'):
        check_update(off, torch.tensor(float('nan')), 'at epoch 2 step 1/4')
    # float16 with a scaler: overflowing steps are skipped and the scale halved; once the scale is
    # below 1 the gradients overflow whatever the scale, and training stops.
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 16, enabled=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TrainingStopped, match='overflow persistently') as stopped:
        for step in range(40):
            loss = model(torch.ones(2, 4)).sum() * float('inf')
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            check_update(scaler, norm, f'at epoch 0 step {step}/40')
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    assert 'step 17/40' in str(stopped.value)  # 2**16 halved 17 times is below 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_metrics_of_a_run_killed_mid_line_are_dropped_on_resume(tmp_path):
    from engine import drop_metrics_from
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"epoch": 0, "acc1": 1.0}\n{"mode": "eval", "acc1": 2.0}\n{"epoch": 1, "ac')
    drop_metrics_from(str(path), 1)
    assert path.read_text() == '{"epoch": 0, "acc1": 1.0}\n{"mode": "eval", "acc1": 2.0}\n'


def test_diverging_run_stops_naming_epoch_and_step_and_saves_only_finite_weights(
        tiny_cfg, tiny_data, tmp_path, capsys):
    # A step schedule that multiplies the learning rate by 1e12 after epoch 0.
    code, err = call_main(main_args(tiny_cfg, tiny_data, tmp_path, 'TRAIN.LR_SCHEDULER.NAME', 'step',
                                    'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '1',
                                    'TRAIN.LR_SCHEDULER.DECAY_RATE', '1e12',
                                    'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.EPOCHS', '3'), capsys)
    assert code != 0
    assert re.search(r'training stopped: .* at epoch 1 step \d+/4', err), err
    assert len(err.strip().splitlines()) == 1
    saved = sorted(run_dir(tmp_path).glob('ckpt_*.pth'))
    assert [p.name for p in saved] == ['ckpt_epoch_0.pth']
    for path in saved:
        ckpt = load(path)
        for part in ('model', 'ema'):
            assert all(torch.isfinite(t).all() for t in ckpt[part].values() if t.is_floating_point())


def test_resume_from_a_hostile_checkpoint_runs_nothing(tiny_cfg, tiny_data, tmp_path, capsys):
    marker = tmp_path / 'pwned'
    hostile = hostile_checkpoint(tmp_path / 'hostile.pth', marker)
    for extra in (['--eval'], []):
        code, err = call_main(main_args(tiny_cfg, tiny_data, tmp_path / 'out') + ['--resume', hostile]
                              + extra, capsys)
        assert code != 0
        assert 'refused' in err and 'io.open' in err and str(hostile) in err
        assert not marker.exists()


# ----------------------------------------------------------------------------------- bad images

@pytest.fixture
def damaged_data(tmp_path):
    make_image_folder(tmp_path / 'data' / 'train', per_class=8)
    make_image_folder(tmp_path / 'data' / 'val', per_class=2, seed=1)
    return tmp_path / 'data', damage(tmp_path / 'data' / 'train')


def test_run_with_a_damaged_image_stops_naming_it(tiny_cfg, damaged_data, tmp_path, capsys):
    data, bad = damaged_data
    code, err = call_main(main_args(tiny_cfg, data, tmp_path / 'out', 'TRAIN.EPOCHS', '1'), capsys)
    assert code != 0
    assert err.startswith('error: unreadable image ') and len(err.strip().splitlines()) == 1
    assert any(path in err for path in bad)


def test_run_skipping_damaged_images_reports_them(tiny_cfg, damaged_data, tmp_path, capsys):
    data, bad = damaged_data
    code, err = call_main(main_args(tiny_cfg, data, tmp_path / 'out', 'TRAIN.EPOCHS', '1',
                                    'DATA.SKIP_CORRUPT', 'True'), capsys)
    assert code == 0, err
    log = (run_dir(tmp_path / 'out') / 'log_rank0.txt').read_text()
    assert 'epoch 0: skipped 2 unreadable image(s)' in log
    listed = (run_dir(tmp_path / 'out') / 'skipped_images.txt').read_text().splitlines()
    assert sorted(line.split('\t')[0] for line in listed) == sorted(bad)


# -------------------------------------------------------------------------------- user mistakes

def _checkpoint_of_another_width(tmp: Path) -> Path:
    from models import FocalNet
    path = tmp / 'wide.pth'
    torch.save({'model': FocalNet(embed_dim=16, depths=(1, 1, 1, 1), num_classes=2).state_dict()}, path)
    return path


def _data_with_unknown_validation_class(tmp: Path) -> Path:
    make_image_folder(tmp / 'd2' / 'train', classes=('a', 'b'), per_class=4)
    make_image_folder(tmp / 'd2' / 'val', classes=('a', 'zebra'), per_class=1)
    return tmp / 'd2'


# name: (argv from (config, data, output folder, tmp folder), what the one line must say)
MISTAKES = {
    'missing data path': (lambda c, d, o, t: main_args(c, t / 'nowhere', o), 'data path not found'),
    'missing config file': (lambda c, d, o, t: main_args(t / 'nope.yaml', d, o), 'config file not found'),
    'missing checkpoint': (lambda c, d, o, t: main_args(c, d, o) + ['--resume', t / 'nope.pth'],
                           'checkpoint not found'),
    'unknown config key': (lambda c, d, o, t: main_args(c, d, o, 'TRAIN.EPOCHZ', '3'),
                           'unknown config key in --opts: TRAIN.EPOCHZ'),
    'checkpoint that does not fit': (
        lambda c, d, o, t: main_args(c, d, o) + ['--eval', '--resume', _checkpoint_of_another_width(t)],
        'does not fit the model: 83 of another shape: patch_embed.proj.weight file [16, 3, 4, 4] vs model [8, 3, 4, 4]'),
    'validation class the training set lacks': (
        lambda c, d, o, t: main_args(c, _data_with_unknown_validation_class(t), o),
        "class(es) the training set lacks: zebra"),
    'batch larger than the data set': (
        lambda c, d, o, t: main_args(c, d, o, 'DATA.BATCH_SIZE', '64'), 'fewer than one global batch'),
}


@pytest.mark.parametrize('mistake', list(MISTAKES))
def test_user_mistake_gives_one_line_and_nonzero_exit(mistake, tiny_cfg, tiny_data, tmp_path, capsys):
    make_argv, expected = MISTAKES[mistake]
    code, err = call_main(make_argv(tiny_cfg, tiny_data, tmp_path / 'out', tmp_path), capsys)
    assert code != 0
    assert err.startswith('error: ') and len(err.strip().splitlines()) == 1, err
    assert expected in err


def test_command_line_mistake_prints_no_traceback(tiny_cfg, tiny_data, tmp_path):
    done = run_main(main_args(tiny_cfg, tiny_data, tmp_path, 'TRAIN.EPOCHZ', '3'), timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip() == 'error: unknown config key in --opts: TRAIN.EPOCHZ (did you mean TRAIN.EPOCHS?)'


# ---------------------------------------------------------------------------------- distributed

def test_a_failing_rank_takes_the_job_down(tiny_cfg, tiny_data, tmp_path):
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
               '--master_port', str(free_port()), 'main.py']
    # Rank 1 raises at its third step while rank 0 waits for it in the loss all-reduce.
    done = run_main(main_args(tiny_cfg, tiny_data, tmp_path, 'DATA.BATCH_SIZE', '2', 'DIST_TIMEOUT', '60'),
                    fault='raise@step=2,rank=1', timeout=150, command=command)
    assert done.returncode != 0
    assert 'injected fault at step 2 on rank 1' in done.stdout + done.stderr
    assert not list(run_dir(tmp_path).glob('ckpt_*'))


def test_a_hanging_rank_times_out_and_takes_the_job_down(tiny_cfg, tiny_data, tmp_path):
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
               '--master_port', str(free_port()), 'main.py']
    # Rank 1 stops responding at its third step; rank 0 gives up after DIST_TIMEOUT seconds instead
    # of waiting for ever, and the launcher then ends rank 1.
    done = run_main(main_args(tiny_cfg, tiny_data, tmp_path, 'DATA.BATCH_SIZE', '2', 'DIST_TIMEOUT', '10'),
                    fault='hang@step=2,rank=1', timeout=150, command=command)
    assert done.returncode != 0
    assert 'timed out' in (done.stdout + done.stderr).lower()


