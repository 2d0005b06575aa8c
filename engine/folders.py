"""The output folder: created and probed writable before any work; which process left a file in it."""
import errno
import os
import socket
from typing import List

from errors import UserError

# A temporary file of another host is taken for a dead save's when it has not been written to for this
# long; one of this host is judged by whether its process still lives.
STALE_AFTER_S = 300


def no_space(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC))


def host_tag() -> str:
    return socket.gethostname().replace('.', '-') or 'host'


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_writable_dir(folder: str, probe: bool = True):
    """Create the output folder, and (``probe``) write to it once: a path through a file, a folder
    without write permission or a full disk is found before any work, in one line."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in _ancestors(folder) if os.path.exists(p) and not os.path.isdir(p)), None)
        why = f'{blocker} is a file, not a folder' if blocker else e.strerror or str(e)
        raise UserError(f'cannot create the output folder {folder}: {why}') from None
    if not probe:
        return
    probe = os.path.join(folder, f'.write_test.{host_tag()}.{os.getpid()}')
    try:
        with open(probe, 'wb') as f:
            f.write(b'0' * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        why = 'no space left on the device' if no_space(e) else e.strerror or str(e)
        raise UserError(f'cannot write to the output folder {folder}: {why}') from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def _ancestors(path: str) -> List[str]:
    path = os.path.abspath(path)
    chain = [path]
    while os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    return chain[::-1]
