"""One training run per output folder.

The first process of a job (rank 0) creates ``run.lock`` in the folder, exclusively, holding its host,
process id and start time, and keeps its modification time fresh while it runs. A second run aimed at
the same folder stops before it writes anything there, naming the holder. A lock whose holder is gone
is taken over with a warning: on the same host when its process no longer exists, from another host
when it has not been refreshed for ``STALE_AFTER_S`` seconds. The other processes of the job hold
nothing themselves; they learn rank 0's outcome and stop with it.
"""
import json
import os
import socket
import threading
import time
from typing import Optional

from errors import UserError
from utils import all_gather_objects, get_rank
from .folders import STALE_AFTER_S, ensure_writable_dir, process_alive

LOCK_NAME = 'run.lock'
HEARTBEAT_S = 30  # how often the holder refreshes the lock; well below STALE_AFTER_S


class FolderInUse(UserError):
    """Another live run holds the output folder."""


def _process_start(pid: int) -> Optional[str]:
    """The start time of a process of this host in clock ticks since boot (Linux); tells a process
    apart from a later one that reuses its id. None where /proc is not there."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict, lock_path: str) -> bool:
    if holder.get('host') == socket.gethostname():
        pid = holder.get('pid')
        if not isinstance(pid, int) or not process_alive(pid):
            return False
        start = holder.get('start')
        return start is None or _process_start(pid) in (None, start)
    try:
        return time.time() - os.path.getmtime(lock_path) < STALE_AFTER_S
    except OSError:
        return False


def _describe(holder: dict) -> str:
    return (f'host {holder.get("host", "?")}, pid {holder.get("pid", "?")}, '
            f'since {holder.get("since", "?")}')


class RunLock:
    """``with RunLock(folder):`` around a training run; every process of the job enters it."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._stop = threading.Event()
        self._thread = None
        self.held = False
        self.note = ''  # what the log should say about taking the lock over, once it is set up

    def __enter__(self) -> 'RunLock':
        problem = None
        if get_rank() == 0:
            try:
                self._acquire()
            except UserError as e:
                problem = str(e)
        # Every process stops if rank 0 could not take the folder, before any of them writes to it.
        problems = [p for p in all_gather_objects(problem) if p]
        if problems:
            self.release()
            raise FolderInUse(problems[0])
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def _acquire(self):
        ensure_writable_dir(self.folder, probe=False)
        for _ in range(3):  # a lock taken over or released by someone else meanwhile: look again
            if self._create():
                return
            holder = self._read_holder()
            if holder is None:
                continue
            if _holder_alive(holder, self.path):
                raise FolderInUse(f'the output folder {self.folder} is in use by another run '
                                  f'({_describe(holder)}); stop that run, or give this one another '
                                  f'--output or --tag')
            # The holder is gone. Renaming is atomic: of two runs taking over, one wins.
            stale = f'{self.path}.stale.{socket.gethostname()}.{os.getpid()}'
            try:
                os.rename(self.path, stale)
            except FileNotFoundError:
                continue
            os.remove(stale)
            self.note = f'{self.path}: took over the lock of a run that is gone ({_describe(holder)})'
        raise FolderInUse(f'the output folder {self.folder} is in use by another run that keeps '
                          f'changing its lock {self.path}')

    def _create(self) -> bool:
        holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'start': _process_start(os.getpid()),
                  'since': time.strftime('%Y-%m-%d %H:%M:%S')}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise UserError(f'cannot write to the output folder {self.folder}: {e.strerror or e}') from None
        with os.fdopen(fd, 'w') as f:
            json.dump(holder, f)
        self.held = True
        self._thread = threading.Thread(target=self._heartbeat, name='run-lock', daemon=True)
        self._thread.start()
        return True

    def _read_holder(self) -> Optional[dict]:
        """The holder's record, None when the lock went away. One that stays unreadable (a run
        writing it right now, or a damaged file) is judged by its age, as another host's."""
        for _ in range(5):
            try:
                with open(self.path) as f:
                    text = f.read()
            except FileNotFoundError:
                return None
            try:
                holder = json.loads(text)
                if isinstance(holder, dict):
                    return holder
            except ValueError:
                pass
            time.sleep(0.1)
        return {'host': '?', 'pid': '?', 'since': 'unreadable lock file'}

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.held:
            self.held = False
            try:
                with open(self.path) as f:
                    mine = json.load(f).get('pid') == os.getpid()
                if mine:  # never another run's lock
                    os.remove(self.path)
            except (OSError, ValueError, AttributeError):
                pass
