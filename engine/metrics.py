"""metrics.jsonl: one JSON record per line, appended durably; a resumed run rewrites its future."""
import json
import os
from typing import Optional

from utils import get_rank


def append_metrics(path: str, record: dict):
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # name the file (a failed write alone does not): "no space left ... for <path>"
        raise OSError(e.errno, e.strerror, path) from None


def drop_metrics_from(path: str, position: int, key: str = 'epoch'):
    """Forget training records whose ``key`` (epoch, or iteration for iteration-based runs) is
    ``position`` or later: a resumed run writes them again. Evaluation records stay."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]

    def keep(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:  # the last line of a run killed while writing it
            return False
        return record.get('mode') == 'eval' or record.get(key, -1) < position

    kept = [line if line.endswith('\n') else line + '\n' for line in lines if keep(line)]
    if len(kept) != len(lines):
        tmp = path + '.tmp'
        with open(tmp, 'w') as f:
            f.writelines(kept)
        os.replace(tmp, path)


def tensorboard_writer(output_dir: str) -> Optional[object]:
    """A TensorBoard SummaryWriter into the run's folder on rank 0; None on the other ranks."""
    if get_rank() != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(output_dir)
