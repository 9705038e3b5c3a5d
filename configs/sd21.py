"""Stable Diffusion 2.x: U-Net 865.9M with head dim 64 and linear projections, OpenCLIP-H text (23 layers).

Inspect the networks (parameter counts), optionally loading a diffusers folder:

  python train.py --config configs/sd21.py [--config.init=/models/a-diffusers-folder]
"""

import ml_collections

from configs import common


def get_config(arg=None):
  del arg  # no variants yet
  config = ml_collections.ConfigDict()
  config.model = common.model('sd21')
  config.init = ''  # a diffusers folder to load the weights from (load_diffusers); '' = random
  config.seed = 0
  return config
