"""Pre-emption and mid-epoch resume, one run per output folder, resuming with a changed config, and
checkpoints whose entries are unusable. Real runs of a tiny model on a real image folder (the shared
``uninterrupted`` run is the reference), real signals."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_runs import (STEPS_PER_EPOCH, assert_same_final_state, call_main, check_busy_folder_is_refused,
                       free_port, load, main_args, run_dir, run_main, start_ranks)


def metrics(folder: Path) -> list:
    return [json.loads(line) for line in (folder / 'metrics.jsonl').read_text().splitlines()]


def checkpoints(folder: Path) -> list:
    return sorted(p.name for p in folder.glob('ckpt_*.pth'))


# ---------------------------------------------------------------------------------- pre-emption

def test_sigterm_saves_the_step_and_a_rerun_ends_with_the_uninterrupted_weights(
        tiny_cfg, tiny_data, tmp_path, uninterrupted):
    args = main_args(tiny_cfg, tiny_data, tmp_path)
    # A real SIGTERM arrives before step 1 of epoch 1: that step is finished, then the run saves.
    stopped = run_main(args, fault=f'term@step={STEPS_PER_EPOCH + 1}')
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    folder = run_dir(tmp_path)
    line = f'stopped by SIGTERM at epoch 1 step 2/4; saved {folder}/ckpt_epoch_1_step_2.pth; ' \
           f'run the same command to continue from there'
    assert stopped.stderr.strip().splitlines()[-1] == line
    assert 'Traceback' not in stopped.stderr
    assert checkpoints(folder) == ['ckpt_epoch_0.pth', 'ckpt_epoch_1_step_2.pth']
    position = load(folder / 'ckpt_epoch_1_step_2.pth')['position']
    assert (position['epoch'], position['step'], position['steps_per_epoch']) == (1, 2, 4)
    assert not (folder / 'run.lock').exists()  # released on the way out

    resumed = run_main(args)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'ckpt_epoch_1_step_2.pth: continuing at epoch 1 step 2/4' in resumed.stdout
    # Not one bit differs: weights, EMA, optimizer moments, schedule, generators.
    assert_same_final_state(folder / 'ckpt_epoch_1.pth', uninterrupted)
    assert checkpoints(folder) == ['ckpt_epoch_0.pth', 'ckpt_epoch_1.pth']  # the step file is spent
    reference = metrics(uninterrupted.parent)
    assert [r['train_loss'] for r in metrics(folder)] == [r['train_loss'] for r in reference]


def test_sigterm_with_the_fast_input_path_and_workers_resumes_exactly(tiny_cfg, tmp_path_factory, tmp_path):
    """The same SIGTERM and rerun on JPEG photos at 64 px, where training takes the fast input path
    (8-bit batches, erasing after collation; data/fast_transform.py) with two loader workers."""
    from photos import write_photo_folder
    data = write_photo_folder(tmp_path_factory.mktemp('photos'), 16, 4, sizes=(64, 160))
    options = ('DATA.IMG_SIZE', '64', 'DATA.FAST_PIPELINE', 'True')
    reference = tmp_path / 'uninterrupted'
    done = run_main(main_args(tiny_cfg, data, reference, *options))
    assert done.returncode == 0, done.stderr[-3000:]
    args = main_args(tiny_cfg, data, tmp_path / 'stopped', *options)
    stopped = run_main(args, fault=f'term@step={STEPS_PER_EPOCH + 1}')
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    resumed = run_main(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'continuing at epoch 1 step 2/4' in resumed.stdout
    assert_same_final_state(run_dir(tmp_path / 'stopped') / 'ckpt_epoch_1.pth', run_dir(reference) / 'ckpt_epoch_1.pth')


def test_sigint_inside_an_accumulated_step_finishes_that_step(tiny_cfg, tiny_data, tmp_path):
    # Two micro-batches per step: Ctrl-C during the first finishes the second before saving.
    stopped = run_main(main_args(tiny_cfg, tiny_data, tmp_path, 'TRAIN.ACCUMULATION_STEPS', '2'),
                       fault=f'int@step={STEPS_PER_EPOCH}')
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith('stopped by SIGINT at epoch 1 step 2/4; saved ')
    assert checkpoints(run_dir(tmp_path)) == ['ckpt_epoch_0.pth', 'ckpt_epoch_1_step_2.pth']


def test_periodic_step_checkpoints_survive_a_kill(tiny_cfg, tiny_data, tmp_path, uninterrupted):
    # SAVE_MINUTES this small saves after every step; SIGKILL gives no chance to save.
    args = main_args(tiny_cfg, tiny_data, tmp_path, 'SAVE_MINUTES', '1e-9')
    killed = run_main(args, fault=f'kill@step={STEPS_PER_EPOCH + 3}')
    assert killed.returncode == -signal.SIGKILL
    folder = run_dir(tmp_path)
    # Only the newest mid-epoch checkpoint is kept.
    assert checkpoints(folder) == ['ckpt_epoch_0.pth', 'ckpt_epoch_1_step_3.pth']
    resumed = run_main(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'continuing at epoch 1 step 3/4' in resumed.stdout
    assert_same_final_state(folder / 'ckpt_epoch_1.pth', uninterrupted)


def test_preemption_of_one_rank_stops_every_rank_at_the_same_step(tiny_cfg, tiny_data, tmp_path):
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
               '--master_port', str(free_port()), 'main.py']
    # Only rank 1 receives SIGTERM, before its step 1; rank 0 learns it after that step.
    done = run_main(main_args(tiny_cfg, tiny_data, tmp_path, 'DATA.BATCH_SIZE', '2', 'DATA.NUM_WORKERS', '0'),
                    fault='term@step=1,rank=1', timeout=200, command=command)
    assert done.returncode != 0
    folder = run_dir(tmp_path)
    assert checkpoints(folder) == ['ckpt_epoch_0_step_2.pth']
    position = load(folder / 'ckpt_epoch_0_step_2.pth')['position']
    assert position['step'] == 2 and len(position['rng']) == 2  # both processes' generators
    assert not torch.equal(position['rng'][0]['torch'], position['rng'][1]['torch'])
    for rank in (0, 1):
        log = (folder / f'log_rank{rank}.txt').read_text()
        assert 'stopped by SIGTERM at epoch 0 step 2/4' in log
        assert 'Train: [0/2][2/' not in log


# ------------------------------------------------------------------------ one run per output folder

def test_a_second_run_on_a_folder_in_use_stops_and_leaves_it_untouched(tiny_cfg, tiny_data, tmp_path):
    args = main_args(tiny_cfg, tiny_data, tmp_path)
    folder = run_dir(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS='1', FOCALNET_FAULT='hang@step=1')
    pid = check_busy_folder_is_refused([sys.executable, 'main.py', *map(str, args)], env, folder,
                                       lambda: run_main(args, timeout=120))
    # The killed run left its lock; the next run takes it over, saying so, and trains.
    taken = run_main(args + ['--opts', 'TRAIN.EPOCHS', '1'])
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert f'took over the lock of a run that is gone (host {socket.gethostname()}, pid {pid}' \
        in (folder / 'log_rank0.txt').read_text()


def _lock(folder: Path, **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'run.lock').write_text(json.dumps(dict({'since': 'then'}, **holder)))
    return folder / 'run.lock'


def _dead_pid() -> int:
    proc = subprocess.Popen(['true'])
    proc.wait()
    return proc.pid


def test_lock_of_a_dead_or_silent_holder_is_taken_over_a_live_one_is_not(tmp_path):
    from engine import FolderInUse, RunLock
    host = socket.gethostname()
    with subprocess.Popen(['sleep', '60']) as alive:
        try:
            _lock(tmp_path / 'a', host=host, pid=alive.pid)
            with pytest.raises(FolderInUse, match=f'host {host}, pid {alive.pid}'):
                RunLock(str(tmp_path / 'a')).__enter__()
        finally:
            alive.kill()
    # Same host, process gone; or another host that stopped refreshing its lock long ago.
    _lock(tmp_path / 'b', host=host, pid=_dead_pid())
    stale = _lock(tmp_path / 'c', host='elsewhere', pid=1)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    for name in ('b', 'c'):
        with RunLock(str(tmp_path / name)) as lock:
            assert 'took over the lock of a run that is gone' in lock.note
            assert json.loads((tmp_path / name / 'run.lock').read_text())['pid'] == os.getpid()
        assert not (tmp_path / name / 'run.lock').exists()
    # Another host refreshing its lock is alive as far as anyone can tell.
    _lock(tmp_path / 'd', host='elsewhere', pid=1)
    with pytest.raises(FolderInUse, match='host elsewhere, pid 1'):
        RunLock(str(tmp_path / 'd')).__enter__()


def test_temporary_files_of_a_live_process_are_never_deleted(tmp_path):
    from config import load_config
    from engine.checkpoint import save_checkpoint
    host = socket.gethostname().replace('.', '-')
    with subprocess.Popen(['sleep', '60']) as alive:
        try:
            live = tmp_path / f'.ckpt_epoch_3.pth.{host}.{alive.pid}.tmp'
            dead = tmp_path / f'.ckpt_epoch_2.pth.{host}.{_dead_pid()}.tmp'
            remote = tmp_path / '.ckpt_epoch_2.pth.elsewhere.1.tmp'
            for path in (live, dead, remote):
                path.write_bytes(b'part of a checkpoint')
            model = torch.nn.Linear(2, 2)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            save_checkpoint(str(tmp_path / 'ckpt_epoch_0.pth'), model=model, optimizer=optimizer,
                            lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1),
                            scaler=torch.amp.GradScaler('cpu', enabled=False), epoch=0,
                            best_score=0.0, config=load_config())
            # The dead save's file goes; the live process's stays, as does another host's being written.
            assert live.exists() and remote.exists() and not dead.exists()
        finally:
            alive.kill()


# --------------------------------------------------------------- resuming with a changed config

def test_a_longer_schedule_resumed_follows_the_current_config(tiny_cfg, tiny_data, tmp_path, uninterrupted):
    from config import load_config
    from lr_scheduler import build_scheduler
    folder = run_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / 'ckpt_epoch_1.pth').write_bytes(uninterrupted.read_bytes())  # trained 2 epochs of 2
    extended = ['TRAIN.EPOCHS', '4', 'TRAIN.WEIGHT_DECAY', '0.1']
    done = run_main(main_args(tiny_cfg, tiny_data, tmp_path, *extended, 'PRINT_FREQ', '1'))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the config differs from that of" in done.stdout
    assert "TRAIN.EPOCHS 2 -> 4; TRAIN.WEIGHT_DECAY 0.05 -> 0.1" in done.stdout
    # The rate of epoch 2's first step is the four-epoch schedule's, not the two-epoch one's minimum.
    config = load_config(str(tiny_cfg), extended)
    scale = config.DATA.BATCH_SIZE / 512
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.TRAIN.BASE_LR * scale)
    build_scheduler(config, optimizer, STEPS_PER_EPOCH, scale).step_update(2 * STEPS_PER_EPOCH)
    expected = optimizer.param_groups[0]['lr']
    assert expected > 10 * config.TRAIN.MIN_LR * scale
    (line,) = [line for line in done.stdout.splitlines() if 'Train: [2/4][0/4]  ' in line]
    assert f'  lr {expected:.6e}  ' in line
    final = load(folder / 'ckpt_epoch_3.pth')
    assert [g['weight_decay'] for g in final['optimizer']['param_groups']] == [0.1, 0.0]


def test_a_complete_run_says_so_and_a_shorter_schedule_is_an_error(tiny_cfg, tiny_data, tmp_path,
                                                                   uninterrupted, capsys):
    folder = run_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / 'ckpt_epoch_1.pth').write_bytes(uninterrupted.read_bytes())
    code, err = call_main(main_args(tiny_cfg, tiny_data, tmp_path), capsys)
    assert code == 0 and err == ''
    assert 'the run is already complete: ' in (folder / 'log_rank0.txt').read_text()
    assert checkpoints(folder) == ['ckpt_epoch_1.pth']
    code, err = call_main(main_args(tiny_cfg, tiny_data, tmp_path, 'TRAIN.EPOCHS', '1'), capsys)
    assert code == 2
    assert err == f'error: {folder}/ckpt_epoch_1.pth has trained 2 epochs, more than TRAIN.EPOCHS 1; ' \
                  f'raise TRAIN.EPOCHS to continue it, or give a new run another --output or --tag\n'


# -------------------------------------------------------- checkpoints with unusable entries

def _break(ckpt: dict, what: str) -> dict:
    if what == 'model is a list':
        ckpt['model'] = list(ckpt['model'].values())
    elif what == 'NaN weight':
        ckpt['model']['head.bias'][0] = float('nan')
    elif what == 'inf in the EMA':
        ckpt['ema']['norm.weight'][1] = float('inf')
    elif what == 'sparse tensor':
        ckpt['model']['head.bias'] = ckpt['model']['head.bias'].to_sparse()
    elif what == 'meta tensor':
        ckpt['model']['head.bias'] = torch.empty(2, device='meta')
    elif what == 'epoch is text':
        ckpt['epoch'] = 'one'
    elif what == 'negative epoch':
        ckpt['epoch'] = -7
    elif what == 'accuracy is NaN':
        ckpt['max_accuracy'] = float('nan')
    elif what == 'optimizer without param groups':
        del ckpt['optimizer']['param_groups']
    elif what == 'scaler of text':
        ckpt['scaler'] = {'scale': 'big'}
    elif what == 'rng without numpy':
        del ckpt['rng']['numpy']
    elif what == 'rng torch state of floats':
        ckpt['rng']['torch'] = torch.zeros(5)
    return ckpt


BROKEN = {  # what is done to the file: what the one line must name
    'model is a list': '"model" entry is a list, not a state dict of tensors',
    'NaN weight': '"model" entry head.bias has 1 non-finite value(s)',
    'inf in the EMA': '"ema" entry norm.weight has 1 non-finite value(s)',
    'sparse tensor': '"model" entry head.bias is a torch.sparse_coo tensor',
    'meta tensor': '"model" entry head.bias holds no data (a meta tensor',
    'epoch is text': "the \"epoch\" entry is 'one'; expected a whole number >= -1",
    'negative epoch': 'the "epoch" entry is -7; expected a whole number >= -1',
    'accuracy is NaN': 'the "max_accuracy" entry is nan; expected a finite number',
    'optimizer without param groups': 'the "optimizer" entry is not an optimizer state',
    'scaler of text': 'the "scaler" entry is not a gradient-scaler state',
    'rng without numpy': 'the "rng" entry is not a set of random-generator states (KeyError',
    'rng torch state of floats': 'the "rng" entry is not a set of random-generator states',
}


@pytest.fixture(scope='module')
def reference_state(uninterrupted) -> dict:
    return load(uninterrupted)


@pytest.mark.filterwarnings('ignore:Validating sparse tensor invariants')
@pytest.mark.parametrize('what', list(BROKEN))
def test_an_unusable_entry_is_named_and_auto_resume_passes_over_the_file(what, tmp_path, uninterrupted,
                                                                         reference_state, caplog):
    import copy
    import logging
    from models import FocalNet
    from engine.resume import find_resume_checkpoint, load_checkpoint
    good = tmp_path / 'ckpt_epoch_1.pth'
    good.write_bytes(uninterrupted.read_bytes())
    bad = tmp_path / 'ckpt_epoch_2.pth'
    torch.save(_break(copy.deepcopy(reference_state), what), bad)
    with caplog.at_level(logging.WARNING, logger='focalnet'):
        path, _ = find_resume_checkpoint(str(tmp_path))
    assert path == str(good)
    warned = [r.getMessage() for r in caplog.records if 'passing over' in r.getMessage()]
    assert len(warned) == 1 and str(bad) in warned[0] and BROKEN[what] in warned[0], warned
    # Given explicitly (--resume), the same line ends the run, before anything is loaded.
    model = FocalNet(embed_dim=8, depths=(1, 1, 1, 1), num_classes=2, img_size=32)
    optimizer = torch.optim.AdamW(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from errors import UserError
    with pytest.raises(UserError) as info:
        load_checkpoint(str(bad), model=model, optimizer=optimizer,
                        scaler=torch.amp.GradScaler('cpu', enabled=True))
    assert str(bad) in str(info.value) and BROKEN[what] in str(info.value)
    assert '\n' not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_launch_environment_and_ranks_with_different_configs(tiny_cfg, tiny_data, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.delenv('MASTER_ADDR', raising=False)
    monkeypatch.delenv('MASTER_PORT', raising=False)
    code, err = call_main(main_args(tiny_cfg, tiny_data, tmp_path), capsys)
    assert code == 2
    assert err == 'error: RANK=0, WORLD_SIZE=2 set but not MASTER_ADDR, MASTER_PORT: start the processes ' \
                  'with torchrun (which sets all four), or unset RANK and WORLD_SIZE to run one process\n'
    monkeypatch.undo()
    # Two processes of one job started with different commands: both stop at once, naming the key.
    procs = start_ranks(lambda rank: [sys.executable, 'main.py', *map(str, main_args(
        tiny_cfg, tiny_data, tmp_path, 'TRAIN.EPOCHS', str(2 + rank)))])
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2
        assert err.strip() == 'error: the processes were started with different configs: rank 1 has ' \
                              'TRAIN.EPOCHS 3 where rank 0 has 2; start every process with the same command'
    assert not run_dir(tmp_path).exists()


def test_a_resumed_run_continues_the_gradient_scaler(tmp_path):
    """float16 training keeps a loss scale that grows and shrinks with the gradients; a resumed run
    must go on from the saved scale and growth count, not from a fresh scaler's. A CPU scaler runs the
    same code as a CUDA one."""
    from config import load_config
    from engine.checkpoint import save_checkpoint
    from engine.resume import load_checkpoint
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10, growth_interval=2, enabled=True)
    for step in range(8):  # overflowing steps halve the scale, runs of good ones double it
        loss = model(torch.ones(2, 4)).sum() * (float('inf') if step in (1, 2, 4) else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    saved = scaler.state_dict()
    assert saved['scale'] == 2.0 ** 8 and saved['_growth_tracker'] == 1
    path = str(tmp_path / 'ckpt_epoch_0.pth')
    save_checkpoint(path, model=model, optimizer=optimizer,
                    lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1), scaler=scaler, epoch=0,
                    best_score=0.0, config=load_config())
    fresh = torch.amp.GradScaler('cpu', init_scale=2.0 ** 16, growth_interval=2, enabled=True)
    load_checkpoint(path, model=torch.nn.Linear(4, 2),
                    optimizer=torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.1), scaler=fresh)
    assert fresh.state_dict() == saved
