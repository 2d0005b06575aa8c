"""The command-line contract of every entry point: one line and an exit code, never a traceback.

    0    done (or nothing left to do)
    2    a mistake the user can fix: a bad path, value, key, or a checkpoint that does not fit
    3    training cannot go on: a non-finite loss, a full disk; the newest checkpoint is intact
    143  stopped by SIGTERM (130: SIGINT) after saving the position reached: run the same command
         to continue (see engine/preemption.py for why 128 + the signal number)
"""
import argparse
import logging
import signal
import sys
from typing import Callable

from errors import TrainingStopped, UserError
from logger import NAME as LOGGER_NAME, close_logger
from utils import cleanup_distributed, get_rank

from .folders import no_space
from .preemption import EXIT_BASE, Preempted

logger = logging.getLogger(LOGGER_NAME)

EXIT_USER_ERROR = 2
EXIT_STOPPED = 3


def run_cli(run: Callable[[], int]) -> int:
    """``run()``'s exit status; user errors and stops reported in one line on every process."""
    from models.pretrained import CheckpointError
    try:
        return run()
    except (UserError, CheckpointError) as e:
        report(f'error: {e}')
        return EXIT_USER_ERROR
    except TrainingStopped as e:
        report(f'training stopped: {e}')
        return EXIT_STOPPED
    except Preempted as e:
        report(str(e), console=get_rank() == 0)  # every process stops at the same step: say it once
        return e.exit_code
    except KeyboardInterrupt:
        report('interrupted (SIGINT): stopped at once, without saving; the newest checkpoint in the '
               'output folder is intact')
        return EXIT_BASE + signal.SIGINT
    except OSError as e:
        if not no_space(e):
            raise
        where = f' for {e.filename}' if e.filename else ''
        report(f'training stopped: no space left on the device{where}; the checkpoints already in the '
               f'folder are intact')
        return EXIT_STOPPED
    finally:
        cleanup_distributed()
        close_logger()


def report(message: str, console: bool = True):
    """One line on stderr from every process (the failing one may not be rank 0; ``console`` False
    leaves it out), and in the log file."""
    message = ' '.join(line.strip() for line in message.splitlines())
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, None))
    if console:
        print(message, file=sys.stderr, flush=True)


def add_run_arguments(parser: argparse.ArgumentParser, *, cfg_help: str, opts_example: str,
                      data_help: str, pretrained_help: str, cfg_required: bool = True):
    """The flags every entry point takes, each setting the config key config.get_config names; a task
    adds its own after these."""
    parser.add_argument('--cfg', metavar='FILE', required=cfg_required, help=cfg_help)
    parser.add_argument('--opts', nargs='+', default=None, metavar='KEY VALUE',
                        help=f'override config keys: --opts {opts_example}')
    parser.add_argument('--data-path', help=data_help)
    parser.add_argument('--batch-size', type=int, help='images per process and step')
    parser.add_argument('--resume', help='checkpoint to resume from, or to evaluate with --eval (its '
                        'stored config is used; --cfg and --opts override only the keys they name)')
    parser.add_argument('--pretrained', help=pretrained_help)
    parser.add_argument('--eval', action='store_true', help='evaluate only')
    parser.add_argument('--accumulation-steps', type=int, help='micro-batches per optimizer step')
    parser.add_argument('--use-checkpoint', action='store_true', help='gradient checkpointing')
    parser.add_argument('--amp-opt-level', choices=['O0', 'O1', 'O2'],
                        help='O0 turns mixed precision off; O1 and O2 both use torch.amp')
    parser.add_argument('--output', metavar='PATH', help='output root; a run writes <output>/<name>/<tag>')
    parser.add_argument('--tag', help='name of the run under the model name')
    # Passed by the legacy torch.distributed.launch; torchrun sets LOCAL_RANK in the environment instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None, help=argparse.SUPPRESS)
