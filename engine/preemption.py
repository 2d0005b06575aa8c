"""Stopping cleanly when the cluster asks: SIGTERM and SIGINT become a request to stop after the
current optimizer step, and periodic mid-epoch saves are decided on the same clock.

Schedulers pre-empt a job with SIGTERM and kill it a grace period later; Ctrl-C sends SIGINT. The
handler only records the signal. The training loop asks :meth:`Preemption.poll` after every optimizer
step; the answer is summed over the processes, so all of them stop (or save) after the same step even
when only one was signalled. A second SIGINT stops at once, without a save.
"""
import signal
import threading
import time
from typing import Optional, Tuple

import torch

from utils import all_reduce_sum

# A run stopped by a signal exits as a process killed by that signal is reported by shells, Slurm and
# Kubernetes (128 + the signal number: 143 for SIGTERM, 130 for SIGINT), so requeue scripts that already
# treat 143 as "pre-empted" keep working; unlike a kill, the run saved its state first.
EXIT_BASE = 128


class Preempted(Exception):
    """Training stopped on a signal after saving; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = EXIT_BASE + signum


class Preemption:
    """Use as ``with Preemption(device, save_minutes) as stop:``; then ``stop.poll()`` after every step.

    save_minutes: > 0 asks for a mid-epoch save every that many minutes (0: only on a signal). The
    clock starts at ``with`` and again at every :meth:`saved`.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, device: torch.device = torch.device('cpu'), save_minutes: float = 0.0):
        self.device, self.save_minutes = device, save_minutes
        self.signum: Optional[int] = None
        self._previous = {}
        self._last_save = time.monotonic()

    def __enter__(self) -> 'Preemption':
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        self._last_save = time.monotonic()
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    @property
    def exit_code(self) -> int:
        return EXIT_BASE + (self.signum or signal.SIGTERM)

    def poll(self) -> Tuple[bool, bool]:
        """(stop, save), the same on every process: stop when any process was signalled, save when
        stopping or when the periodic save is due (by the clock of any process)."""
        due = self.save_minutes > 0 and time.monotonic() - self._last_save >= 60 * self.save_minutes
        flags = torch.tensor([float(self.signum is not None), float(due)], device=self.device)
        stop, save = (all_reduce_sum(flags) > 0).tolist()
        return stop, stop or save

    def saved(self):
        """A checkpoint was written: the periodic clock starts again."""
        self._last_save = time.monotonic()

    def stopped(self, where: str, path: Optional[str]) -> Preempted:
        """The exception that ends the run, with its one line."""
        saved = f'saved {path}; ' if path else ''
        return Preempted(f'stopped by {self.signal_name} {where}; {saved}run the same command to '
                         f'continue from there', self.signum or signal.SIGTERM)
