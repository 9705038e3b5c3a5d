"""Training entry point: `python train.py --config configs/shapes.py:ldm --workdir runs/ldm`.

Every config's docstring holds its own commands. `--config.a.b=v` overrides a value; unknown
keys are refused. The run resumes from the workdir's latest checkpoint when there is one.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ldm_jax import cli_logging
from ldm_jax import config_check
from ldm_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and samples go.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  cli_logging.setup()
  try:
    loop.train(_CONFIG.value, _WORKDIR.value)
  except loop.NonFiniteLossError as e:
    logging.error('%s', e)
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  problem = config_check.unknown_override(sys.argv)
  if problem:  # before absl parses the flags: its own error does not list the valid keys
    sys.exit(f'error: {problem}')
  app.run(main)
