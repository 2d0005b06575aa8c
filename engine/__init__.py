"""The pieces every training entry point shares (classification, detection, segmentation).

main.py, ``python -m detection`` and ``python -m segmentation`` connect them; none of them owns a
copy. Here: starting a run and building the optimizer (run.py), checkpoint files (checkpoint.py),
what a checkpoint holds (checkpoint_checks.py), loading and resume_or_load (resume.py), the
epoch-based runs' checkpoints, positions and steps (epochs.py), seeds (seed.py), the output folder
(folders.py), the lock, pre-emption, the optimizer step, the next batch moved to the device during a
step (ahead.py), AMP, metrics and progress, the command-line contract (cli.py), and the config's
rules and merging (config_checks.py, config_merge.py). Distributed processes are utils.py, the
defaults config.py, the logger logger.py, the optimizer and the learning-rate scaling and schedules
optimizer.py and lr_scheduler.py. run.py and epochs.py import the config, so they are imported by
name (engine.run, engine.epochs), not from here.
"""
from .amp import amp_dtype, make_autocast, make_scaler
from .cli import report, run_cli
from .ddp import check_same_config, match_grad_layout, wrap_ddp
from .lock import FolderInUse, RunLock
from .metrics import append_metrics, drop_metrics_from, record, tensorboard_writer
from .preemption import Preempted, Preemption
from .progress import Progress, memory_mb
from .step import OptimizerStep, check_update

__all__ = ['amp_dtype', 'make_autocast', 'make_scaler', 'report', 'run_cli', 'match_grad_layout',
           'wrap_ddp', 'check_same_config', 'FolderInUse', 'RunLock', 'append_metrics',
           'drop_metrics_from', 'record', 'tensorboard_writer', 'Preempted', 'Preemption', 'Progress',
           'memory_mb', 'OptimizerStep', 'check_update']
