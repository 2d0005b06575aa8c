"""metrics.jsonl: one JSON record per line, appended durably; a resumed run rewrites its future.

Every line is strict JSON: Python's json writes NaN and Infinity, which JSON does not have and most
readers (jq, JavaScript, pandas with the default engine) reject. An undefined value (the mIoU of a
set whose labels are all ignored, the loss of an interval without steps) is written as null, and the
log names the keys.
"""
import json
import logging
import math
import os
from typing import List, Optional

from utils import get_rank

logger = logging.getLogger('focalnet')


def strict_json(value, undefined: List[str], key: str = ''):
    """``value`` with every non-finite float replaced by None; the keys replaced go to ``undefined``."""
    if isinstance(value, float) and not math.isfinite(value):
        undefined.append(key or '(value)')
        return None
    if isinstance(value, dict):
        return {k: strict_json(v, undefined, f'{key}.{k}' if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v, undefined, f'{key}[{i}]') for i, v in enumerate(value)]
    return value


def append_metrics(path: str, record: dict):
    undefined: List[str] = []
    line = json.dumps(strict_json(record, undefined), allow_nan=False)
    if undefined:
        logger.warning(f'{os.path.basename(path)}: {", ".join(undefined)} undefined (NaN or infinite); '
                       f'recorded as null')
    try:
        with open(path, 'a') as f:
            f.write(line + '\n')
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
