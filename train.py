"""Training entry point: `python train.py --config configs/shapes.py:ldm --workdir runs/ldm`.

Every config's docstring holds its own commands. `--config.a.b=v` overrides a value; unknown
keys are refused. The run resumes from the workdir's latest checkpoint when there is one.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ldm_jax import checkpoint
from ldm_jax import cli_logging
from ldm_jax import config_check
from ldm_jax.train import loop
from ldm_jax.train import preflight

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
  except (preflight.ConfigError, FileNotFoundError) as e:  # the user's to fix: no traceback
    _exit(e)
  except (loop.NonFiniteError, checkpoint.CheckpointError) as e:  # the run stopped; why, once
    logging.error('%s', e)
    sys.exit(f'error: {e}')


def _exit(message):
  """Leaves with `error: <message>` on stderr and exit code 2 (a usage error)."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


if __name__ == '__main__':
  # Before absl parses the flags: its config loader gives a missing file, a refused config
  # argument (an unknown stage) or an unknown key as a traceback, without the valid choices.
  problem = config_check.startup_problem(sys.argv)
  if problem:
    _exit(problem)
  app.run(main)
