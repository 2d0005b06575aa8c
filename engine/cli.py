"""The command-line contract of every entry point: one line and an exit code, never a traceback.

    0    done (or nothing left to do)
    2    a mistake the user can fix: a bad path, value, key, or a checkpoint that does not fit
    3    training cannot go on: a non-finite loss, a full disk; the newest checkpoint is intact
    143  stopped by SIGTERM (130: SIGINT) after saving the position reached: run the same command
         to continue (see engine/preemption.py for why 128 + the signal number)
"""
import errno
import logging
import signal
import sys
from typing import Callable

from errors import TrainingStopped, UserError
from logger import NAME as LOGGER_NAME, close_logger
from utils import cleanup_distributed, get_rank

from .preemption import EXIT_BASE, Preempted

logger = logging.getLogger(LOGGER_NAME)

EXIT_USER_ERROR = 2
EXIT_STOPPED = 3


def _no_space(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC))


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
        if not _no_space(e):
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
