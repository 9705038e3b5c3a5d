"""Tiny random networks (two levels, 32/64 channels) on the shapes dataset: a smoke test.

  python -m ldm_jax.data build shapes --data_dir data --image_size 32 --num_train 64 --num_holdout 16
  python train.py --config configs/tiny.py --workdir runs/tiny
"""

from configs import common


def get_config(arg=None):
  common.variants('configs/tiny.py', arg)  # no variants: refuses any argument
  c = common.training('ldm', 'tiny', 'shapes/s32_n64_h16_seed0', 'data', resolution=32,
                      batch_size=8)
  c.tokenizer = 'shapes'
  c.allow_random_vae = True  # no VAE run needed for a smoke test
  c.text_encoder.trainable = True
  c.model.text_encoder = {'vocab_size': 0}  # the tokenizer's size
  c.num_steps = 20
  c.log_every = 5
  c.ckpt_every = 10
  c.sample_every = 0
  return c
