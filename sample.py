"""Sampling entry point (thin): builds the networks named by a config and reports them.

  python sample.py --config configs/sd15.py [--config.init=/models/stable-diffusion-v1-5]

Text-to-image sampling arrives with the sampling issue; until then this checks a config,
loads its weights when `config.init` names a diffusers folder, and prints parameter counts.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ldm_jax import inspect_networks

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  print(inspect_networks.report(_CONFIG.value))


if __name__ == '__main__':
  app.run(main)
