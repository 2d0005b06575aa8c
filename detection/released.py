"""Released mmdetection checkpoints into the detectors written with mmdetection's names (ATSS, ...).

Each such detector keeps a ``RELEASED_KEYS`` table beside its model: prefixes of the released file's
keys -> prefixes of the model's. Loading is strict: a key no prefix covers, a tensor the model lacks,
one the file lacks, or one of another shape is a CheckpointError listing them on one line.
"""
from typing import Dict, Mapping

import torch
import torch.nn as nn

from models.pretrained import CheckpointError
from models.state_fit import fit_problems

def is_released_detector(state: Mapping[str, torch.Tensor]) -> bool:
    """A whole mmdetection detector (backbone and more), not a bare backbone."""
    return any(k.startswith('backbone.') for k in state) and any(
        not k.startswith('backbone.') for k in state)


def load_released(model: nn.Module, state: Mapping[str, torch.Tensor], key_map: Mapping[str, str],
                  source: str = 'state dict') -> Dict[str, object]:
    """Map every tensor of ``state`` through ``key_map`` and load them all, strictly. Returns
    {'source', 'num_tensors', 'renamed': number of keys whose prefix changed}."""
    mapped, uncovered, renamed = {}, [], 0
    prefixes = sorted(key_map, key=len, reverse=True)
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            uncovered.append(key)
            continue
        mapped[key_map[prefix] + key[len(prefix):]] = value
        renamed += key_map[prefix] != prefix
    # Keys no prefix covers keep their file names: the model lacks them either way.
    problems = fit_problems({**{k: state[k] for k in uncovered}, **mapped}, model.state_dict(), sep=', ')
    if problems:
        raise CheckpointError(f'{source} does not fit the {type(model).__name__} detector: '
                              + '; '.join(problems))
    model.load_state_dict(mapped, strict=True)
    return {'source': source, 'num_tensors': len(mapped), 'renamed': renamed}
