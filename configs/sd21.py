"""Stable Diffusion 2.x: U-Net 865.9M (head dim 64, linear projections), OpenCLIP-H text.

Fine-tune the U-Net from a diffusers folder on your own captioned images (the default variant):

  python -m ldm_jax.data build folder --src my_images/ --data_dir data
  python train.py --config configs/sd21.py:finetune --workdir runs/sd21_ft \
      --config.init=/models/stable-diffusion-2-1 --config.data.name=image_folder/my_images

From scratch (every network random; bring a tokenizer folder and a trained VAE run):

  python train.py --config configs/sd21.py:scratch --workdir runs/sd21_scratch \
      --config.tokenizer=tokenizers/clip --config.vae_workdir=runs/vae --config.data.name=...

Add ',runlocal' (`configs/sd21.py:finetune,runlocal`) for a CPU smoke run with the tiny preset
on the shapes dataset (build it first: python -m ldm_jax.data build shapes --data_dir data
--image_size 32 --num_train 64 --num_holdout 16).
"""

from configs import common


def get_config(arg='finetune'):
  return common.stable_diffusion('sd21', 768, 'v_prediction', arg)
