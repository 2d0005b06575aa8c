"""Small real training runs shared by the reliability tests: a two-class image folder, a tiny model
with every random part of the recipe on, main.py run in a fresh process or called in this one, and a
comparison of final states to the last bit."""
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Tuple

import numpy as np
import torch
from PIL import Image


def make_image_folder(root: Path, classes=('a', 'b'), per_class=6, size=32, seed=0) -> Path:
    """root/<class>/<i>.png with random RGB content."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f'{i}.png')
    return root


ROOT = Path(__file__).resolve().parents[1]
# Every random part of the recipe is on: RandAugment, random erasing, mixup/cutmix, drop path, EMA,
# and two loader worker processes (batches alternate between them).
TINY_RUN = """
DATA: {IMG_SIZE: 32, BATCH_SIZE: 4, NUM_WORKERS: 2, DATASET: folder}
MODEL:
  NAME: tiny
  DROP_PATH_RATE: 0.3
  FOCAL: {EMBED_DIM: 8, DEPTHS: [1, 1, 1, 1]}
TRAIN:
  EPOCHS: 2
  WARMUP_EPOCHS: 1
  BASE_LR: 0.5
  EMA: {ENABLED: True, DECAY: 0.9}
AUG: {REPROB: 0.5}
PRINT_FREQ: 100
"""
STEPS_PER_EPOCH = 4  # 16 training images, batches of 4


def main_args(cfg, data, output, *opts) -> list:
    args = ['--cfg', str(cfg), '--data-path', str(data), '--output', str(output), '--tag', 't']
    return args + (['--opts', *opts] if opts else [])


def run_dir(output) -> Path:
    return Path(output) / 'tiny' / 't'


def run_main(args, fault='', timeout=300, command=None) -> subprocess.CompletedProcess:
    """main.py in a fresh process, one compute thread (the same count in every run)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', FOCALNET_FAULT=fault)
    command = command or [sys.executable, 'main.py']
    return subprocess.run(command + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def call_main(argv, capsys):
    """main.main in this process: (exit status, stderr). The run's log handlers (bound to this
    test's captured output) are removed afterwards, so later tests log as before."""
    import main
    log = logging.getLogger('focalnet')
    handlers, propagate, level = list(log.handlers), log.propagate, log.level
    capsys.readouterr()
    try:
        code = main.main([str(a) for a in argv])
    finally:
        for handler in log.handlers:
            if handler not in handlers:
                handler.close()
        log.handlers[:] = handlers
        log.propagate, log.level = propagate, level
    return code, capsys.readouterr().err


def max_difference(a, b) -> float:
    """Largest absolute difference between two nested structures of tensors and numbers; inf when
    their keys or shapes differ."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return math.inf
        return max([max_difference(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return math.inf
        return max([max_difference(x, y) for x, y in zip(a, b)] or [0.0])
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return math.inf
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, (int, float)):
        return abs(a - b)
    return 0.0 if a == b else math.inf


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_final_state(resumed: Path, reference: Path):
    a, b = load(reference), load(resumed)
    for key in ('model', 'ema', 'optimizer', 'lr_scheduler', 'scaler', 'epoch', 'max_accuracy', 'rng'):
        difference = max_difference(a[key], b[key])
        print(f'{key}: max |uninterrupted - resumed| = {difference}')
        assert difference == 0.0, key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def check_busy_folder_is_refused(command: list, env: dict, folder: Path,
                                 second_run: Callable[[], subprocess.CompletedProcess]) -> int:
    """Start ``command`` (a training run told to hang at a step), wait for its first progress line in
    ``folder``, then ``second_run`` on the same folder: it must stop with the lock's one line and touch
    nothing, and the first run must go on. Returns the first run's pid (it is killed at the end)."""
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not ((folder / 'log_rank0.txt').is_file() and 'Train:' in (folder / 'log_rank0.txt').read_text()):
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        second = second_run()
        assert second.returncode == 2
        assert second.stderr.strip() == (
            f'error: the output folder {folder} is in use by another run (host {socket.gethostname()}, '
            f'pid {first.pid}, since {json.loads(before["run.lock"])["since"]}); stop that run, or give '
            f'this one another --output or --tag')
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    return first.pid


def start_ranks(command: Callable[[int], list], world_size: int = 2) -> list:
    """One process per rank, each with the environment torchrun gives it (one thread, no fault
    injection); ``command(rank)`` is its command line. Returns the processes, output piped as text."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {k: v for k, v in os.environ.items() if k != 'FOCALNET_FAULT'}
        env.update(OMP_NUM_THREADS='1', RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
        procs.append(subprocess.Popen(command(rank), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def sigterm_once_logged(command: list, log: Path, marker: str, threads: int = 1) -> Tuple[int, str]:
    """Start ``command``, send it SIGTERM as soon as ``marker`` appears in its ``log`` file (as a
    scheduler pre-empts a job) and wait for it. Returns its exit status and standard error."""
    env = {k: v for k, v in os.environ.items() if k != 'FOCALNET_FAULT'}
    env.update(PYTHONUNBUFFERED='1', OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while not (log.is_file() and marker in log.read_text()) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err
