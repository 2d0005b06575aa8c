"""Errors main.py reports in one line, without a traceback."""


class UserError(Exception):
    """A mistake in the command or its inputs: a missing file, an unknown config key, a checkpoint that
    does not fit the model. The message says what is wrong and names the value."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (for example the loss became NaN); nothing was saved after the cause."""
