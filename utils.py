"""Distributed processes: optional, read from the environment that torchrun and torch.distributed.launch
set; one process when RANK is absent. Rank, world size and the collectives the engine uses."""
import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

from errors import UserError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_distributed(local_rank: Optional[int] = None, timeout_s: float = 1800) -> torch.device:
    """Join the process group when a launcher started this process (RANK in the environment); return
    the device this process computes on. NCCL on CUDA, gloo on the CPU. A collective that waits longer
    than ``timeout_s`` for a process (one that died or hangs) fails instead of waiting forever."""
    if 'LOCAL_RANK' in os.environ:
        local_rank = int(os.environ['LOCAL_RANK'])
    local_rank = local_rank or 0
    if torch.cuda.is_available():
        device = torch.device('cuda', local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels once
    else:
        device = torch.device('cpu')
    if ('RANK' in os.environ or 'WORLD_SIZE' in os.environ) and not is_distributed():
        _check_launch_environment()
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        kwargs = {'device_id': device} if device.type == 'cuda' else {}
        dist.init_process_group(backend=backend, init_method='env://',
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return device


def _check_launch_environment():
    """A process group needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a half-set environment
    would otherwise end in a rendezvous error or a wait until the timeout."""
    names = ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        given = ', '.join(f'{n}={os.environ[n]}' for n in names if os.environ.get(n))
        raise UserError(f'{given} set but not {", ".join(missing)}: start the processes with torchrun '
                        f'(which sets all four), or unset RANK and WORLD_SIZE to run one process')
    values = {}
    for name in ('RANK', 'WORLD_SIZE', 'MASTER_PORT'):
        try:
            values[name] = int(os.environ[name])
        except ValueError:
            raise UserError(f'{name}={os.environ[name]!r} is not a whole number') from None
    if not 0 <= values['RANK'] < values['WORLD_SIZE']:
        raise UserError(f'RANK={values["RANK"]} must be from 0 to WORLD_SIZE - 1 = {values["WORLD_SIZE"] - 1}')


def cleanup_distributed():
    if is_distributed():
        dist.destroy_process_group()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (just [obj] when not distributed)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over all processes (the tensor itself when not distributed)."""
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over all processes, each share divided before the sum (mmdetection's order,
    which its loss normalisers follow)."""
    return all_reduce_sum(values / get_world_size())
