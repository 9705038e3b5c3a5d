"""Stable Diffusion 1.x (v1-4, v1-5): U-Net 859.5M, VAE 83.7M, CLIP-L text 123.1M.

Fine-tune the U-Net from a diffusers folder on your own captioned images (the default variant):

  python -m ldm_jax.data build folder --src my_images/ --data_dir data
  python train.py --config configs/sd15.py:finetune --workdir runs/sd15_ft \
      --config.init=/models/stable-diffusion-v1-5 --config.data.name=image_folder/my_images

From scratch (every network random; bring a tokenizer folder and a trained VAE run):

  python train.py --config configs/sd15.py:scratch --workdir runs/sd15_scratch \
      --config.tokenizer=tokenizers/clip --config.vae_workdir=runs/vae --config.data.name=...

Add ',runlocal' (`configs/sd15.py:finetune,runlocal`) for a CPU smoke run with the tiny preset
on the shapes dataset (build it first: python -m ldm_jax.data build shapes --data_dir data
--image_size 32 --num_train 64 --num_holdout 16).
"""

from configs import common


def get_config(arg='finetune'):
  return common.stable_diffusion('sd15', 512, 'epsilon', arg)
