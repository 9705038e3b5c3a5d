"""Config groups shared by every experiment config: model, diffusion, data, optim, ema, mesh, ..."""

import ml_collections

STAGES = ('vae', 'ldm', 'clip')  # ldm_jax.train.stages.STAGES (configs stay free of ldm_jax)


def variants(spec, arg, default='', stages=None, flags=()):
  """The parts of a config argument ('ldm,runlocal'), refusing unknown ones.

  Args:
    spec: the config file as its docstring names it (for the message): 'configs/shapes.py'.
    arg: the argument after ':' (None or '' for `default`).
    default: the argument when none is given.
    stages: the choices of the first part (a stage), or None when the argument has none.
    flags: the variants that may follow the stage (or, without `stages`, make up the argument).

  Returns:
    The list of parts, the stage first when `stages` is given.

  Raises:
    ValueError: an unknown part, naming the valid ones and an example.
  """
  parts = [p.strip() for p in (arg or default).split(',') if p.strip()]
  valid = f'any of {", ".join(flags)}, comma-separated'
  if stages:
    valid = f'a stage ({", ".join(stages)})' + (f', then optionally {", ".join(flags)}'
                                                 if flags else '')
  example = ','.join([default] * bool(default) + [f for f in flags[-1:] if f != default])
  fix = (f'the argument is {valid}, e.g. {spec}:{example}' if example else
         f'{spec} takes no argument: use {spec}')
  if stages and (not parts or parts[0] not in stages):
    first = parts[0] if parts else ''
    what = 'a variant, not a stage' if first in flags else 'not a stage'
    raise ValueError(f'{spec}:{arg}: {first!r} is {what}; {fix}')
  unknown = [p for p in parts[1 if stages else 0:] if p not in flags]
  if unknown:
    raise ValueError(f'{spec}:{arg}: unknown variant {unknown[0]!r}; {fix}')
  return parts


def model(preset):
  """The `model` group: which networks (a preset of ldm_jax.models) and how they compute.

  Args:
    preset: 'sd15', 'sd21' or 'tiny'. Per-network overrides of the preset go in
      `model.unet`, `model.vae` and `model.text_encoder` (config field names).
  """
  return ml_collections.ConfigDict({
      'preset': preset,
      'dtype': 'float32',  # compute dtype; 'bfloat16' on accelerators
      'param_dtype': 'float32',  # storage dtype (master weights)
      'attention_impl': 'auto',  # flash attention on GPU (cuDNN) and TPU (Pallas), else 'xla'
      'remat': 'none',  # 'none', 'full' or 'save_dots': what each block keeps for the backward
      'unet': {}, 'vae': {}, 'text_encoder': {},
  })


def training(stage, preset, data_name, data_dir, resolution, batch_size):
  """A complete training config with every group; experiment configs change what they need.

  Args:
    stage: 'vae', 'ldm' or 'clip'.
    preset: the model preset.
    data_name: the dataset (`ldm_jax.data.sources.data_source` name).
    data_dir: the tfds data directory.
    resolution: image side in pixels.
    batch_size: the global batch.
  """
  if stage not in STAGES:
    raise ValueError(f'stage {stage!r} is not one of {", ".join(STAGES)}')
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.model = model(preset)
  c.init = ''  # a diffusers folder to start from (load_diffusers)
  c.init_unet = True  # False: only the VAE and text encoder come from `init`, the U-Net is new
  c.resume = ''  # another run's workdir or checkpoints directory to take the state from
  c.vae_workdir = ''  # ldm stage: the frozen VAE from a vae-stage run (its EMA weights)
  c.precompute_latents = False  # ldm stage: encode the data once into <workdir>/precomputed
  c.allow_random_vae = False  # ldm stage without a trained VAE: smoke tests only
  c.tokenizer = ''  # a tokenizer folder, 'shapes', or '' for the init folder's
  c.text_encoder = ml_collections.ConfigDict({
      'trainable': False,  # train it jointly with the U-Net (the original LDM text-to-image)
      'workdir': '',  # a clip-stage run to take a frozen text encoder from
  })
  c.diffusion = ml_collections.ConfigDict({
      'num_train_timesteps': 1000, 'beta_start': 0.00085, 'beta_end': 0.012,
      'beta_schedule': 'scaled_linear', 'prediction_type': 'epsilon',
      'rescale_betas_zero_snr': False,
      'min_snr_gamma': 0.0,  # 0: plain MSE; 5.0 is the paper's value
      'noise_offset': 0.0,
  })
  c.vae_loss = ml_collections.ConfigDict({
      'kind': 'l1',  # reconstruction: 'l1' or 'l2', a mean over pixels
      'kl_weight': 1e-6,  # KL summed over latent elements, mean over the batch
      'gan': {'enabled': False, 'start_step': 5000, 'weight': 0.5, 'preset': 'tiny'},
  })
  c.clip = ml_collections.ConfigDict({  # the clip stage's image tower and embedding width
      'image_preset': 'tiny', 'projection_dim': 64,
      'pooling': 'mean',  # the tower's image embedding: 'mean' of the patch tokens, or 'cls' (CLIP)
  })
  c.data = ml_collections.ConfigDict({
      'name': data_name, 'data_dir': data_dir, 'split': 'train', 'image_key': 'image',
      'caption_key': 'caption', 'resolution': resolution, 'crop': 'center', 'flip': False,
      'caption_dropout': 0.1 if stage == 'ldm' else 0.0,  # for classifier-free guidance
      'batch_size': batch_size, 'seed': 0, 'num_epochs': None, 'shuffle': True,
      'worker_count': 0, 'min_image_size': 0, 'skip_empty_captions': False, 'max_length': 77,
      'precomputed': False,
      'prefetch': 2,  # batches made and placed on the devices ahead of the step (0: none)
      # grain's reading threads (None: 16 for images, 0 for precomputed records)
      'read_threads': ml_collections.config_dict.placeholder(int),
      # aspect-ratio buckets: None (squares of `resolution`), 'auto' (resolution^2 area in 64 px
      # steps), 'sdxl' (SDXL's 1024^2 set) or 'WxH,WxH,...' (ldm_jax/data/buckets.py)
      'buckets': ml_collections.config_dict.placeholder(str),
  })
  c.optim = ml_collections.ConfigDict({
      'name': 'adamw', 'lr': 1e-4, 'warmup_steps': 500, 'schedule': 'constant',
      'final_lr_fraction': 0.0, 'b1': 0.9, 'b2': 0.999, 'eps': 1e-8, 'weight_decay': 1e-2,
      'clip_norm': 1.0, 'grad_accum': 1,
  })
  c.ema = ml_collections.ConfigDict({'decay': 0.9999, 'warmup': True, 'start_step': 0})
  c.mesh = (('data', -1), ('fsdp', 1))  # a tuple: --config.mesh="(('data', -1), ('fsdp', 8))"
  c.distributed = ml_collections.ConfigDict({  # multi-host runs (README: Multi-host and FSDP)
      'coordinator_address': '',  # 'host:port' of process 0; '': a single process
      'num_processes': 1, 'process_id': 0,  # with coordinator_address: who this process is
      'auto': False,  # let JAX find the above itself: TPU pods, SLURM, Open MPI
      'initialization_timeout': 300,  # seconds to wait for every process to join
      'cpu_collectives': 'gloo',  # cross-process collectives of the CPU backend
      'heartbeat_timeout_s': 60,  # a process silent this long is lost: the others stop (exit 75)
  })
  c.sharding = ml_collections.ConfigDict({
      # (regex over 'params/unet/down_blocks_0/...' paths, 'replicate' | 'fsdp' | axis tuple)
      'rules': [('.*', 'fsdp')],  # with fsdp=1 this replicates everything
  })
  c.sample = ml_collections.ConfigDict({  # previews every sample_every steps
      'prompts': ['a red circle'], 'steps': 25, 'sampler': 'ddim', 'guidance': 4.0,
  })
  c.eval = ml_collections.ConfigDict({  # in-training evaluation (ldm_jax/train/evaluate.py)
      'target': '',  # printed with each evaluation, e.g. 'fid<=90,clip_cosine>=0.15' (MLPerf)
      'every': 0,  # steps between evaluations, and at the last step (0: none)
      'metrics': 'fid,clip',  # comma-separated: shapes, fid, clip
      'prompts_file': '',  # one prompt per line ('': the shapes prompts, or the data's captions)
      'num_images': 64,  # prompts repeated or cut to this many (0: the file's count)
      'batch_size': 16, 'steps': 25, 'sampler': 'dpmpp_2m', 'guidance': 7.5, 'seed': 0,
      'fid_stats': '',  # reference statistics: a pytorch-fid / clean-fid .npz (mu, sigma)
      'inception': '',  # the FID Inception weights (pt_inception-2015-12-05-6726825d.pth)
      'clip': '',  # a transformers CLIPModel folder or an open_clip checkpoint
  })
  c.num_steps = 10000
  c.log_every = 50
  c.ckpt_every = 1000
  c.sample_every = 1000  # 0: no previews
  c.keep_checkpoints = 3
  c.seed = 0
  # JAX's persistent compilation cache: a restarted run loads its compiled step from here.
  # 'auto': $JAX_COMPILATION_CACHE_DIR if set, else <user cache dir>/ldm_jax/jax; '': off.
  c.compilation_cache_dir = 'auto'
  return c


def stable_diffusion(preset, resolution, prediction_type, arg='finetune'):
  """The SD 1.x/2.x ldm config: ':finetune' (default), ':scratch', ',runlocal' (see sd15.py),
  and for SD 2 ':mlperf' (`mlperf`)."""
  mlperf_flag = ('mlperf',) if preset == 'sd21' else ()  # MLPerf's benchmark trains SD 2
  args = variants(f'configs/{preset}.py', arg, 'finetune',
                  flags=('finetune', 'scratch') + mlperf_flag + ('runlocal',))
  if {'finetune', 'scratch'} <= set(args):
    raise ValueError(f'configs/{preset}.py:{arg}: choose finetune or scratch, not both')
  c = training('ldm', preset, 'image_folder/my_images', 'data', resolution=resolution,
               batch_size=64)
  c.model.dtype = 'bfloat16'  # float32 master weights (param_dtype), bf16 compute
  c.model.remat = 'full'  # recompute each block in the backward: SD activations do not fit
  c.diffusion.prediction_type = prediction_type  # from scratch; fine-tuning uses the init folder's
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
  if 'mlperf' in args:
    mlperf(c)
  if 'runlocal' in args:  # the whole loop in seconds on CPU
    c.model.preset = 'tiny'
    c.model.dtype = 'float32'
    c.model.remat = 'none'
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


def mlperf(c):
  """MLPerf Training's Stable Diffusion benchmark (mlcommons/training stable_diffusion,
  train_512_moments.yaml): the SD 2 U-Net (865.9M) from scratch at 512 px with the v objective,
  the frozen VAE and OpenCLIP-H of the `init` folder (stable-diffusion-2-base), AdamW at
  1.25e-7 x the global batch of 512 with 10,000 linear warm-up steps, no gradient clipping, no
  EMA; evaluated on COCO-2014 captions with 50 DDIM steps at guidance 8 (FID against the
  val2014 30k statistics, CLIP score with ViT-H/14): target FID <= 90 and CLIP >= 0.15."""
  c.init_unet = False
  c.diffusion.prediction_type = 'v_prediction'
  c.text_encoder.trainable = False
  c.data.resolution = 512
  c.data.batch_size = 512
  c.data.crop, c.data.flip = 'center', False
  c.optim.lr = 1.25e-7 * c.data.batch_size
  c.optim.warmup_steps = 10000
  c.optim.weight_decay = 0.01  # torch's AdamW default, which the reference uses
  c.optim.clip_norm = 0.0
  c.ema.decay = 0.0  # no EMA: the evaluated weights are the trained ones
  c.num_steps = 100000  # the benchmark stops when the evaluation reaches the target
  c.ckpt_every = 1000
  c.sample_every = 0
  c.eval.update(every=1000, metrics='fid,clip', num_images=30000, batch_size=64,
                sampler='ddim', steps=50, guidance=8.0, target='fid<=90,clip_cosine>=0.15')

