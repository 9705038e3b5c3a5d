"""Logging set-up shared by the entry points (`train.py`, `sample.py`)."""

import logging as logging_std
import sys

from absl import logging

_NOISY = ('/orbax/', '/tensorflow_datasets/', '/grain/')


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax, tfds and grain (every save or restore logs a dozen lines),
  and keeps their errors to one line each: a failed save is reported once, with its cause, by
  `checkpoint.Checkpointer`; the background threads' tracebacks would bury it."""

  def filter(self, record):
    library = any(n in record.pathname for n in _NOISY) or record.name == 'asyncio'
    if not library:
      return True
    if record.levelno < logging_std.WARNING:
      return False
    if record.name == 'asyncio' and 'exception was never retrieved' in record.getMessage():
      return False  # the same failed write, once per array
    record.exc_info, record.exc_text = None, None
    return True


def _is_closed_loop(kind, value):
  return kind is RuntimeError and str(value) == 'Event loop is closed'


def _without_closed_loop_errors(hook):
  """`sys.unraisablehook` that drops 'Event loop is closed': TensorStore's callbacks of a failed
  async save, arriving after orbax closed its event loop (hundreds of identical tracebacks; the
  failure itself is reported once, by `checkpoint.Checkpointer`)."""
  def quiet(unraisable):
    if not _is_closed_loop(unraisable.exc_type, unraisable.exc_value):
      hook(unraisable)
  return quiet


def setup():
  """INFO for our own logs; orbax, tfds and grain log only warnings and errors, one line each."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.unraisablehook = _without_closed_loop_errors(sys.unraisablehook)
