"""metrics.jsonl: one JSON record per line, appended durably; a resumed run rewrites its future. And
the TensorBoard writer beside it.

Every line is strict JSON: Python's json writes NaN and Infinity, which JSON does not have and most
readers (jq, JavaScript, pandas with the default engine) reject. An undefined value (the mIoU of a
set whose labels are all ignored, the loss of an interval without steps) is written as null, and the
log names the keys.
"""
import json
import logging
import math
import os
from contextlib import contextmanager
from typing import Iterator, List, Optional

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


def record(out: str, values: dict, writer=None, step: int = 0, scalars=(), prefix: str = 'epoch'):
    """Record an epoch or an evaluation interval, on rank 0: ``values`` appended to the metrics.jsonl
    of the output folder ``out``, and those of its ``scalars`` keys that are set to TensorBoard as
    <prefix>/<key> at ``step``."""
    if get_rank() != 0:
        return
    append_metrics(os.path.join(out, 'metrics.jsonl'), values)
    if writer is not None:
        for key in scalars:
            if values.get(key) is not None:
                writer.add_scalar(f'{prefix}/{key}', values[key], step)
        writer.flush()


def record_evaluation(out: str, loader, checkpoint: str, values: dict):
    """After an evaluation run (--eval): the images it skipped reported, and its record ('mode':
    'eval', the weights evaluated, ``values``) appended to <out>/metrics.jsonl by rank 0."""
    from data.robust import report_skipped
    report_skipped((loader,), 'evaluation', out)
    if get_rank() == 0:
        append_metrics(os.path.join(out, 'metrics.jsonl'), {'mode': 'eval', 'checkpoint': checkpoint, **values})


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


@contextmanager
def open_tensorboard(output_dir: str) -> Iterator[Optional[object]]:
    """``with open_tensorboard(out) as writer:`` :func:`tensorboard_writer`, closed at the end of the
    block however it ends (its last events are written)."""
    writer = tensorboard_writer(output_dir)
    try:
        yield writer
    finally:
        if writer is not None:
            writer.close()
