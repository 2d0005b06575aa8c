"""A named logger: the console on rank 0, and a log_rank{R}.txt file for every rank.

A record logged with ``extra={'file_only': True}`` (the whole config) goes to the file only.
"""
import logging
import os
import sys

from termcolor import colored

NAME = 'focalnet'


class _CurrentStdout(logging.StreamHandler):
    """Writes to sys.stdout as it is when a record is emitted: tests and notebooks replace (and close)
    sys.stdout, and a handler holding an old one would fail on every later record."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


class _LogFile(logging.FileHandler):
    """A log file whose write errors (a full disk) are reported in one line, once, instead of a
    traceback per record; the run itself stops at its next checkpoint or metrics write."""

    def handleError(self, record):
        if not getattr(self, '_failed', False):
            self._failed = True
            error = sys.exc_info()[1]
            reason = getattr(error, 'strerror', None) or error
            print(f'warning: cannot write the log file {self.baseFilename}: {reason}', file=sys.stderr,
                  flush=True)

    def close(self):
        try:
            super().close()
        except OSError:  # the last buffered lines could not be written either; already reported
            pass


def create_logger(output_dir: str, rank: int = 0, name: str = NAME) -> logging.Logger:
    close_logger(name)  # a second call (a test, a notebook) starts afresh
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the handlers below are the whole output; no duplicates via the root
    fmt = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
    datefmt = '%Y-%m-%d %H:%M:%S'
    if rank == 0:
        console = _CurrentStdout()
        console.setFormatter(logging.Formatter(
            colored('[%(asctime)s %(name)s]', 'green') + colored('(%(filename)s %(lineno)d)', 'yellow')
            + ': %(levelname)s %(message)s', datefmt=datefmt))
        console.addFilter(lambda record: not getattr(record, 'file_only', False))
        logger.addHandler(console)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = _LogFile(os.path.join(output_dir, f'log_rank{rank}.txt'), mode='a')
        file_handler.setFormatter(logging.Formatter(fmt, datefmt=datefmt))
        logger.addHandler(file_handler)
    return logger


def close_logger(name: str = NAME):
    """Detach and close the handlers create_logger added (the log files stay as written), and hand the
    logger's records back to the root logger."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
