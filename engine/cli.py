"""The command-line contract of every entry point: one line and an exit code, never a traceback, for
what the user can fix (2) and for a run that cannot go on (3)."""
import logging
import sys
from typing import Callable

from errors import TrainingStopped, UserError
from logger import NAME as LOGGER_NAME, close_logger
from utils import cleanup_distributed

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
    finally:
        cleanup_distributed()
        close_logger()


def report(message: str):
    """One line on stderr from every process (the failing one may not be rank 0), and in the log file."""
    message = ' '.join(line.strip() for line in message.splitlines())
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, None))
    print(message, file=sys.stderr, flush=True)
