"""The embedded default: a tiny text-to-image LDM on the synthetic shapes dataset, on CPU.

Two stages, the VAE first, then the text-conditioned LDM with a jointly trained text encoder.
On a CPU, two simulated devices (data parallel, one per core) train 1.3-1.5x faster than one:

  export JAX_NUM_CPU_DEVICES=2
  python -m ldm_jax.data build shapes --data_dir data --image_size 32 --num_train 4000 \
      --layout centered
  python train.py --config configs/shapes.py:vae --workdir runs/demo/vae
  python train.py --config configs/shapes.py:ldm --workdir runs/demo/ldm \
      --config.vae_workdir=runs/demo/vae
  python sample.py --workdir runs/demo/ldm --prompt "a blue circle" --num_images 8

Add `,runlocal` to the argument (`configs/shapes.py:ldm,runlocal`) for a few-step smoke run.
"""

from configs import common

# The centered layout (one larger object at the center): in the ~10 minutes of training two CPU
# cores give, colour and shape are what the model learns; the scattered layout's nine positions
# and two-object images left its samples at 25% fidelity (README: Status).
DATA = 'shapes/s32_n4000_h200_seed0_centered'  # built by the command above


def get_config(arg='ldm'):
  args = common.variants('configs/shapes.py', arg, 'ldm', stages=common.STAGES,
                         flags=('runlocal',))
  stage = args[0]
  c = common.training(stage, 'tiny', DATA, 'data', resolution=32, batch_size=32)
  c.tokenizer = 'shapes'  # a word-level BPE over the caption vocabulary
  # Sized for two CPU cores. An f=2 VAE (32x32 images -> 16x16x4 latents): a shape then spans
  # 6-8 latent pixels, so the U-Net draws it as it would in pixels (at f=4 it spans 3-4 and comes
  # out a blob). The U-Net attends only at 8x8 and 4x4, and trains from precomputed latents.
  c.model.vae = dict(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=8)
  c.model.unet = dict(block_out_channels=(32, 64, 64), num_attention_heads=4, sample_size=16,
                      in_channels=4, out_channels=4,  # the VAE's latent channels
                      down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D',
                                        'CrossAttnDownBlock2D'),
                      up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
                      cross_attention_dim=64, norm_num_groups=8, layers_per_block=1)
  c.model.text_encoder = dict(vocab_size=0, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=16)  # vocab 0: the tokenizer's
  # Captions are at most 12 words (one token each): a 16-token context, not CLIP's 77, makes the
  # step 15% faster, and the U-Net's cross-attention starts out spread over 16 keys, not 77.
  c.data.max_length = 16
  c.text_encoder.trainable = True  # learned with the U-Net, as in the original LDM
  c.precompute_latents = stage == 'ldm'  # the VAE encodes the dataset once, not every step
  # v-prediction: at high noise the target is ~ the clean latent, so the U-Net (and the text
  # encoder) learn colour and shape from the caption early; eps at high noise teaches little.
  c.diffusion.prediction_type = 'v_prediction'
  c.optim.lr = 2e-3  # small models, short runs
  c.optim.warmup_steps = 100
  # A constant rate for the LDM: it is still improving fast at the end (fidelity on training
  # prompts 69% at step 1000, 86% at 1500, 95% at 2000), where a cosine would be near 0 (over
  # 1000 steps at 1e-3 the two measured alike: 55% cosine, 54-64% constant). The VAE converges
  # and keeps the cosine it was tuned with.
  c.optim.schedule = 'cosine' if stage == 'vae' else 'constant'
  c.ema.decay = 0.999
  c.vae_loss.kl_weight = 1e-6
  c.num_steps = 1000 if stage == 'vae' else 2000
  if stage == 'vae':
    c.data.batch_size = 8  # the f=2 VAE works at full resolution: 0.12 s per step on 2 cores
  c.log_every = 50
  c.ckpt_every = 500
  c.sample_every = c.num_steps  # one preview grid, at the end
  c.sample.prompts = ['a red circle', 'a blue square', 'a green triangle', 'a yellow circle',
                      'a red triangle', 'a blue circle']  # the last two are held out
  c.sample.steps = 20
  if stage == 'ldm':  # prompt fidelity while training (metrics.jsonl, TensorBoard, eval/)
    c.eval.update(every=500, metrics='shapes', num_images=48, batch_size=48, steps=25,
                  sampler='dpmpp_2m', guidance=4.0)  # each of the 24 combinations twice
  if 'runlocal' in args:  # seconds, not minutes: a smoke run of the whole loop
    c.data.name = 'shapes/s32_n64_h16_seed0'
    c.data.batch_size = 8
    c.num_steps = 4
    c.log_every = 1
    c.ckpt_every = 2
    c.sample_every = 4
    c.sample.steps = 2
    c.sample.prompts = ['a red circle', 'a blue square']
    c.eval.every = 0
  return c
