"""Logging set-up shared by the entry points (`train.py`, `sample.py`)."""

import logging as logging_std

from absl import logging


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax and tfds (every save or restore logs a dozen lines)."""

  def filter(self, record):
    noisy = ('/orbax/', '/tensorflow_datasets/', '/grain/')
    return record.levelno >= logging_std.WARNING or not any(n in record.pathname for n in noisy)


def setup():
  """INFO for our own logs; orbax, tfds and grain log only warnings and errors."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
