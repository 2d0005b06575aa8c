"""Where a command will write, checked before it does any work: a prediction run over thousands of
images, an export or a figure should not be computed and then lost to a typo in the output path.

The check writes and removes a probe file in the folder, which catches what permission bits alone
do not (a read-only file system, a full quota, running as root over NFS).
"""
import os
import tempfile
from pathlib import Path

from data.files import not_regular
from errors import UserError


def _probe(folder: Path, flag: str, target: str):
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix='.write-check-'):
            pass
    except OSError as e:
        raise UserError(f'{flag} {target}: cannot write in the folder {folder}: {e.strerror or e}') from None


def check_output_file(target: str, flag: str) -> Path:
    """``target`` as a Path, once it is known that a regular file can be written there: its folder
    exists and takes files, and the name is not a folder, a FIFO or a device. '-' (stdout) passes."""
    path = Path(target)
    if target == '-':
        return path
    if path.is_dir():
        raise UserError(f'{flag} {target} is a folder; give the name of a file to write')
    if os.path.lexists(path):
        problem = not_regular(str(path))
        if problem is not None and problem != 'not found':
            raise UserError(f'{flag} {target} is {problem}, not a regular file')
        if problem is None and not os.access(path, os.W_OK):
            raise UserError(f'{flag} {target}: the file exists and is not writable')
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f'{flag} {target}: output folder not found: {folder}')
    _probe(folder, flag, target)
    return path


def check_output_folder(target: str, flag: str) -> Path:
    """``target`` as a Path, created if needed, once it is known to be a folder that takes files."""
    path = Path(target)
    if os.path.lexists(path) and not path.is_dir():
        problem = not_regular(str(path))
        raise UserError(f'{flag} {target} is {problem or "a file"}; give a folder')
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f'{flag} {target}: cannot create the folder: {e.strerror or e}') from None
    _probe(path, flag, target)
    return path
