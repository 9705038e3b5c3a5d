"""Tiny random networks (two levels, 32/64 channels): for smoke runs and tests on CPU.

Inspect the networks (parameter counts), optionally loading a diffusers folder:

  python train.py --config configs/tiny.py [--config.init=/models/a-diffusers-folder]
"""

import ml_collections

from configs import common


def get_config(arg=None):
  del arg  # no variants yet
  config = ml_collections.ConfigDict()
  config.model = common.model('tiny')
  config.init = ''  # a diffusers folder to load the weights from (load_diffusers); '' = random
  config.seed = 0
  return config
