"""How many loader worker processes to start."""
import os


def worker_count(requested: int) -> int:
    """``requested`` (DATA.NUM_WORKERS), at most the cores this process may use: more workers than
    cores only adds contention (and a warning from the DataLoader)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return min(requested, cores)
