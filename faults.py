"""Fault injection, a test aid: makes a run fail at a chosen point, as a pre-empted or crashing job
would. Off unless the environment variable FOCALNET_FAULT is set; tests/test_reliability.py uses it.

    FOCALNET_FAULT=<action>@<point>=<n>[,rank=<r>]

action: ``kill`` (SIGKILL this process: no handler, no cleanup), ``raise`` (a RuntimeError),
        ``hang`` (sleep for ever, as a process stuck on a dead file system would), or ``term`` /
        ``int`` (send this process a real SIGTERM / SIGINT, as a scheduler's pre-emption or Ctrl-C
        would, and go on: the run's handler decides what follows).
point:  ``step=<n>``: before training step n, counted over the whole run as epoch * steps_per_epoch
        + step (so a resumed run meets it at the same place); ``save=<n>``: while saving the
        checkpoint of epoch n, after the temporary file is complete and before it is renamed.
rank:   only in the process of this rank (default: every process).
"""
import os
import re
import signal
import time

_SPEC = re.compile(r'^(kill|raise|hang|term|int)@(step|save)=(\d+)(?:,rank=(\d+))?$')


def _parse(text: str):
    if not text:
        return None
    m = _SPEC.match(text.strip())
    if not m:
        raise ValueError(f'FOCALNET_FAULT={text!r}: expected <kill|raise|hang|term|int>@<step|save>=<n>[,rank=<r>]')
    action, point, n, rank = m.groups()
    return action, point, int(n), None if rank is None else int(rank)


_FAULT = _parse(os.environ.get('FOCALNET_FAULT', ''))


def inject(point: str, n: int, rank: int = 0):
    """Fail here if FOCALNET_FAULT names this point, n and rank."""
    if _FAULT is None:
        return
    action, where, at, only_rank = _FAULT
    if where != point or at != n or (only_rank is not None and only_rank != rank):
        return
    if action == 'kill':
        os.kill(os.getpid(), signal.SIGKILL)
    if action in ('term', 'int'):
        os.kill(os.getpid(), signal.SIGTERM if action == 'term' else signal.SIGINT)
        return
    while action == 'hang':
        time.sleep(60)
    raise RuntimeError(f'injected fault at {point} {n} on rank {rank} (FOCALNET_FAULT)')
