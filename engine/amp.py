"""Mixed precision: one code path; autocast and the scaler are no-ops when it is off."""
from functools import partial
from typing import Callable, Optional, Tuple

import torch


def amp_dtype(config, device: torch.device) -> Optional[torch.dtype]:
    """bfloat16 where the GPU supports it, else float16; None (float32) on the CPU or with AMP_OPT_LEVEL O0."""
    if device.type != 'cuda' or config.AMP_OPT_LEVEL == 'O0':
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_autocast(device: torch.device, dtype: Optional[torch.dtype]) -> Callable:
    """A context-manager factory: ``with autocast(): ...`` runs in ``dtype``, or unchanged when None."""
    return partial(torch.autocast, device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def make_scaler(device: torch.device, dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """Loss scaling is needed for float16 only; otherwise the scaler passes everything through."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def precision(config, device: torch.device) -> Tuple[Optional[torch.dtype], Callable]:
    """(the AMP dtype of this run, its autocast factory)."""
    dtype = amp_dtype(config, device)
    return dtype, make_autocast(device, dtype)
