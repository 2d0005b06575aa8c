"""Whether a state dict fits a model strictly, said as people read it: counts, then the keys.

One wording for every loader (resume, --pretrained, the released detectors and segmentors), so an
error about a checkpoint reads the same whichever command met it.
"""
from collections.abc import Mapping
from typing import Callable, List, Optional, Sequence

SHOWN = 10


def listing(items: Sequence[str], shown: Optional[int] = SHOWN, sep: str = ', ') -> str:
    """The first ``shown`` items (None: all) joined by ``sep``, and how many more there are."""
    items = list(items)
    shown = len(items) if shown is None else shown
    more = [f'... and {len(items) - shown} more'] if len(items) > shown else []
    return sep.join(items[:shown] + more)


def fit_problems(file_state: Mapping, model_state: Mapping, shown: Optional[int] = SHOWN,
                 sep: str = '\n    ', may_lack: Callable[[str], bool] = lambda key: False) -> List[str]:
    """What keeps ``file_state`` from loading strictly into a model whose state is ``model_state``:
    one entry per kind of problem (keys missing from the file, keys the model lacks, tensors of another
    shape), each its count and the first ``shown`` keys with their shapes joined by ``sep``. Keys
    for which ``may_lack`` is true may be absent from the file. Empty when it fits."""
    def shape(tensor) -> str:
        return str(list(tensor.shape))

    missing = [f'{k} {shape(v)}' for k, v in model_state.items() if k not in file_state and not may_lack(k)]
    unexpected = [f'{k} {shape(v)}' for k, v in file_state.items() if k not in model_state]
    other = [f'{k} file {shape(file_state[k])} vs model {shape(v)}' for k, v in model_state.items()
             if k in file_state and file_state[k].shape != v.shape]
    lead = sep if sep.startswith('\n') else ' '
    return [f'{len(keys)} {what}:{lead}{listing(keys, shown, sep)}'
            for keys, what in ((missing, 'missing from the file'), (unexpected, 'unexpected in the file'),
                               (other, 'of another shape')) if keys]
