"""Progress lines with an ETA, and the memory figure they end with."""
import datetime
import time

import torch


def memory_mb(device: torch.device) -> str:
    if device.type == 'cuda':
        return f' mem {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f}MB'
    import resource  # peak resident memory of this process; Linux reports kilobytes
    return f' rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}MB'


class Progress:
    """Times a loop of ``total`` steps that starts at ``first`` (a resumed run starts later)."""

    def __init__(self, total: int, first: int = 0):
        self.total, self.first = total, first
        self.start = self.last = time.time()

    def tick(self, index: int) -> dict:
        """After step ``index``: seconds of this step, and the estimated time left as h:mm:ss."""
        now = time.time()
        done = index + 1 - self.first
        eta = (now - self.start) / max(done, 1) * (self.total - index - 1)
        step_time, self.last = now - self.last, now
        return {'time': step_time, 'eta': str(datetime.timedelta(seconds=int(eta))),
                'elapsed': now - self.start}
