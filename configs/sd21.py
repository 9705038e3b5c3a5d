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
  args = (arg or 'finetune').split(',')
  c = common.training('ldm', 'sd21', 'image_folder/my_images', 'data', resolution=768,
                      batch_size=64)
  c.model.dtype = 'bfloat16'  # float32 master weights (param_dtype), bf16 compute
  c.model.remat = True  # rematerialise blocks: SD-size activations do not fit otherwise
  c.diffusion.prediction_type = 'v_prediction'  # the released model's; the init folder's scheduler agrees
  c.data.crop = 'random'
  c.data.flip = True
  c.optim.lr = 1e-5  # fine-tuning: diffusers' train_text_to_image default
  c.optim.warmup_steps = 500
  c.ema.decay = 0.9999
  c.num_steps = 15000
  c.sample.prompts = ['a photo of an astronaut riding a horse on the moon']
  if 'scratch' in args:
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 10000  # the CompVis recipe's LambdaLinear warm-up
    c.text_encoder.trainable = True
    c.num_steps = 500000
  if 'runlocal' in args:  # the whole loop in seconds on CPU
    c.model.preset = 'tiny'
    c.model.dtype = 'float32'
    c.model.remat = False
    c.init = ''
    c.allow_random_vae = True
    c.tokenizer = 'shapes'
    c.text_encoder.trainable = True
    c.model.text_encoder = {'vocab_size': 0}  # the tokenizer's size
    c.data.name = 'shapes/s32_n64_h16_seed0'
    c.data.resolution = 32
    c.data.batch_size = 8
    c.num_steps = 4
    c.log_every = 1
    c.ckpt_every = 2
    c.sample_every = 0
  return c
