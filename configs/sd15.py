"""Stable Diffusion 1.x (v1-4, v1-5): U-Net 859.5M, VAE 83.7M, CLIP-L text 123.1M.

Inspect the networks (parameter counts), optionally loading a diffusers folder:

  python train.py --config configs/sd15.py [--config.init=/models/a-diffusers-folder]
"""

import ml_collections

from configs import common


def get_config(arg=None):
  del arg  # no variants yet
  config = ml_collections.ConfigDict()
  config.model = common.model('sd15')
  config.init = ''  # a diffusers folder to load the weights from (load_diffusers); '' = random
  config.seed = 0
  return config
