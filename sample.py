"""Sampling entry point (thin): text-to-image, img2img and inpainting from any kind of weights.

  python sample.py --init /models/stable-diffusion-v1-5 --prompt "a photo of an astronaut" \
      --num_images 4 --batch_size 4 --sampler dpmpp_2m_karras --steps 25 --out samples/
  python sample.py --config configs/sd15.py --config.init=/models/sd15 --prompts_file prompts.txt
  python sample.py --init DIR --prompt "a castle" --init_image in.png --strength 0.6 [--mask m.png]
  python sample.py --init v1-5-pruned-emaonly.safetensors --tokenizer /models/sd15/tokenizer \
      --prompt "a lighthouse"
  python sample.py --init /models/stable-diffusion-xl-base-1.0 --sampler euler --guidance 5 \
      --prompt "a fox" --original_size 1024,1024 --crops_coords_top_left 0,0 --target_size 1024,1024
  python sample.py --init /models/sd15 --lora style.safetensors:0.8 --prompt "a sks dog"

SDXL folders (base or refiner) need no other flags; the base -> refiner hand-off is a library call:
`pipeline.base_and_refiner(base, refiner, prompts, high_noise_frac=0.8, steps=40, ...)`.

Writes 000000.png, ..., grid.png and samples.jsonl (prompt, seed, sampler, ... per image) to
--out. --init takes a diffusers folder or an original .safetensors / .ckpt file; `--workdir
runs/x` samples from one of our training runs (its latest EMA weights, read without writing;
`--vae_workdir` names its VAE run when the run was moved or copied away from it).
--lora FILE[:SCALE] (repeatable) merges LoRAs into any of these (`ldm_jax.sampling.loras`).
"""

import contextlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ldm_jax import checkpoint
from ldm_jax import cli_logging
from ldm_jax import config_check
from ldm_jax.diffusion import pipeline
from ldm_jax.sampling import loras
from ldm_jax.sampling import run
from ldm_jax.sampling import sources

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (optional); its `init` is used like --init.',
    lock_config=True)
_INIT = flags.DEFINE_string('init', None, 'A diffusers folder, or an original single-file '
                            'checkpoint (.safetensors / .ckpt), to sample from (wins over '
                            'config.init).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir (an ldm-stage run) to sample '
                               'from: its latest checkpoint\'s EMA weights.')
_VAE_WORKDIR = flags.DEFINE_string('vae_workdir', None, 'With --workdir: the vae-stage run to '
                                   'take the VAE from, replacing the one the run\'s config names '
                                   '(a run moved or copied away from it).')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'A tokenizer folder: needed with a single '
                                 'file (default: config.tokenizer); replaces a diffusers '
                                 'folder\'s tokenizer/.')
_DTYPE = flags.DEFINE_string('dtype', None, 'Compute dtype, e.g. bfloat16 (default: '
                             'config.model.dtype, else float32; a workdir\'s own).')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat the flag for several.')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'A text file, one prompt a line.')
_NEGATIVE_PROMPT = flags.DEFINE_string('negative_prompt', '', 'Negative prompt for every image.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 1, 'Images per prompt.')
_STEPS = flags.DEFINE_integer('steps', 50, 'Denoising steps.')
_SAMPLER = flags.DEFINE_string('sampler', 'ddim', f'One of {", ".join(pipeline.SAMPLERS)}.')
_GUIDANCE = flags.DEFINE_float('guidance', 7.5, 'Classifier-free guidance scale.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the first generate call; call b uses seed + b.')
_HEIGHT = flags.DEFINE_integer('height', None, 'Image height, a multiple of the VAE\'s '
                               'downsampling factor, 8 for SD (default: the init image\'s, else '
                               'the model\'s native size).')
_WIDTH = flags.DEFINE_integer('width', None, 'Image width, a multiple of the VAE\'s factor.')
_INIT_IMAGE = flags.DEFINE_string('init_image', None, 'An image to start from (img2img).')
_STRENGTH = flags.DEFINE_float('strength', None, 'How much of --init_image to repaint, in '
                               '(0, 1] (default 0.8, or 1.0 with --mask; SDXL: 0.3, or 0.9999).')
_MASK = flags.DEFINE_string('mask', None, 'Inpainting mask for --init_image, white = repaint.')
_OUT = flags.DEFINE_string('out', 'samples/', 'Output folder.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 1, 'Images per generate call.')
_ORIGINAL_SIZE = flags.DEFINE_string('original_size', None, 'SDXL: H,W, the original_size '
                                     'conditioning (default: the image size).')
_CROPS = flags.DEFINE_string('crops_coords_top_left', None, 'SDXL: TOP,LEFT crop conditioning '
                             '(default 0,0).')
_TARGET_SIZE = flags.DEFINE_string('target_size', None, 'SDXL: H,W (default: the image size).')
_LORA = flags.DEFINE_multi_string('lora', [], 'FILE[:SCALE]: a LoRA file (diffusers/PEFT or '
                                   'kohya layout) merged at SCALE (default 1.0); repeatable.')
_AESTHETIC = flags.DEFINE_float('aesthetic_score', None, 'SDXL refiner: the aesthetic score '
                                'conditioning (default 6.0).')


def _request():
  """The sampling request the flags describe."""
  return run.Request(
      prompts=tuple(run.read_prompts(_PROMPT.value, _PROMPTS_FILE.value)),
      negative_prompt=_NEGATIVE_PROMPT.value, num_images=_NUM_IMAGES.value, steps=_STEPS.value,
      sampler=_SAMPLER.value, guidance=_GUIDANCE.value, seed=_SEED.value,
      height=_HEIGHT.value, width=_WIDTH.value, init_image=_INIT_IMAGE.value,
      strength=_STRENGTH.value, mask=_MASK.value, out_dir=_OUT.value,
      batch_size=_BATCH_SIZE.value,
      original_size=run.parse_pair(_ORIGINAL_SIZE.value, 'original_size'),
      crops_coords_top_left=run.parse_pair(_CROPS.value, 'crops_coords_top_left'),
      target_size=run.parse_pair(_TARGET_SIZE.value, 'target_size'),
      aesthetic_score=_AESTHETIC.value, loras=loras.parse_all(_LORA.value))


@contextlib.contextmanager
def _usage_errors():
  """Bad input (ValueError, a missing or unreadable checkpoint) becomes a usage error: its
  message, no trace."""
  try:
    yield
  except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
    raise app.UsageError(str(e)) from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}: quote prompts, --prompt "a b c"')
  cli_logging.setup()

  # Setup: check what the flags alone decide before the (slow) weight loading.
  with _usage_errors():
    source = sources.resolve_model(_INIT.value, _CONFIG.value, _WORKDIR.value, _DTYPE.value,
                                   _TOKENIZER.value, _VAE_WORKDIR.value)
    request = _request()
    run.validate(request, pipeline.SAMPLERS)

  # Model; then the sizes, which must be multiples of this VAE's downsampling factor.
  with _usage_errors():
    sd = pipeline.StableDiffusion(loras.apply_loras(sources.load(source), request.loras))
    run.validate(request, pipeline.SAMPLERS, sd.vae_scale, getattr(sd, 'is_xl', None))

  # Loop.
  run.run(sd, request)


def _one_line_errors(argv):
  """main, with a usage error as one `error: ...` line and exit code 2 (not absl's whole help)."""
  try:
    main(argv)
  except app.UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  # Before absl parses the flags: its config loader gives a missing --config file or a refused
  # config argument as a traceback.
  problem = config_check.startup_problem(sys.argv)
  if problem:
    print(f'error: {problem}', file=sys.stderr)
    sys.exit(2)
  app.run(_one_line_errors)
