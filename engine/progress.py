"""Progress lines with an ETA, and the memory figure they end with."""
import datetime
import time

import torch


def memory_mb(device: torch.device) -> str:
    if device.type == 'cuda':
        return f' mem {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f}MB'
    import resource  # peak resident memory of this process; Linux reports kilobytes
    return f' rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}MB'


# A progress line is due at least this often (besides every PRINT_FREQ steps), so that a slow step on
# a CPU or a long evaluation still shows where it stands and when it will end.
EVERY_S = 5.0


class Progress:
    """Times a loop of ``total`` steps that starts at ``first`` (a resumed run starts later)."""

    def __init__(self, total: int, first: int = 0, every_s: float = EVERY_S):
        self.total, self.first, self.every_s = total, first, every_s
        self.start = self.last = self.shown = time.time()

    def due(self, index: int, print_freq: int = 0) -> bool:
        """Whether step ``index`` should print a progress line: the first and last steps, every
        ``print_freq`` steps, and whenever ``every_s`` seconds have passed since the last line."""
        now = time.time()
        if (index == self.first or index + 1 == self.total or (print_freq and index % print_freq == 0)
                or now - self.shown >= self.every_s):
            self.shown = now
            return True
        return False

    def tick(self, index: int) -> dict:
        """After step ``index``: seconds of this step, and the estimated time left as h:mm:ss."""
        now = time.time()
        done = index + 1 - self.first
        eta = (now - self.start) / max(done, 1) * (self.total - index - 1)
        step_time, self.last = now - self.last, now
        return {'time': step_time, 'eta': str(datetime.timedelta(seconds=int(eta))),
                'elapsed': now - self.start}
