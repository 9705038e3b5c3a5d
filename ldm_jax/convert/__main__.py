"""Converts Stable Diffusion weights between formats: diffusers, single file, Orbax (no torch).

    python -m ldm_jax.convert --src v1-5-pruned-emaonly.safetensors --to diffusers --out sd15/ \
        --tokenizer sd15-tokenizer/
    python -m ldm_jax.convert --src sd15/ --to single_file --out sd15.safetensors
    python -m ldm_jax.convert --src sd15.ckpt --to orbax --out sd15_orbax/
    python -m ldm_jax.convert --src sd_xl_base_1.0.safetensors --to diffusers --out sdxl/ \
        --tokenizer sdxl/tokenizer --tokenizer_2 sdxl/tokenizer_2
    python -m ldm_jax.convert --src style/ --to kohya --base sd15/ --out style_kohya.safetensors
    python -m ldm_jax.convert --src style_kohya.safetensors --to peft --base sd15/ --out style/

SDXL (base and refiner) is handled alike: single files in generative-models' layout (with an
SGM YAML beside a written one), folders with text_encoder_2/ and tokenizer_2/.

The source format is detected: a file is a single-file checkpoint (.safetensors or .ckpt, read
without torch), a folder with model_index.json a diffusers pipeline, a folder with
ldm_jax_orbax.json our Orbax layout (see `orbax_io`). `single_file` output also writes the
original LDM YAML beside the file (OUT with a .yaml suffix), and both the file's metadata and
the YAML hold the exact configs, so the file converts back to the same model. A single-file
source is described by, first found first: the flags (--prediction_type, --image_size,
--scaling_factor; --config or --original_config), the file's metadata, the YAML beside it, the
SD conventions. A summary of what was converted is printed: parameter counts per network,
dtypes, and for single files the detected model type and where each setting came from.

LoRAs: `--to peft` (diffusers' `save_lora_weights` layout: a folder with
pytorch_lora_weights.safetensors, or a .safetensors OUT) or `--to kohya` (lora_unet_..., for
A1111 and ComfyUI) rewrite a LoRA --src of any layout (PEFT, old diffusers, kohya). They need
--base, the model the LoRA was made for (a diffusers or Orbax folder, whose configs alone are
read, or a single file), whose module names and shapes place every adapter; tensors and alphas
are carried over exactly, in the source's dtype unless --dtype says otherwise.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert import diffusers as diffusers_lib
from ldm_jax.convert import lora as lora_io
from ldm_jax.convert import orbax_io
from ldm_jax.convert import single_file
from ldm_jax.convert import tables
from ldm_jax.models import build
from ldm_jax.models import config_io
from ldm_jax.models import lora as lora_lib
from ldm_jax.models import text_encoder as text_encoder_lib
from ldm_jax.models import unet as unet_lib

FORMATS = ('diffusers', 'single_file', 'orbax')
LORA_LAYOUTS = lora_io.LAYOUTS  # --to peft | kohya: --src is a LoRA file
_FILE_DTYPES = {'float32': np.float32, 'float16': np.float16, 'bfloat16': jnp.bfloat16}


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog='python -m ldm_jax.convert', description=__doc__.split('\n')[0],
      epilog='LoRAs: --src LORA --to peft|kohya --base MODEL --out OUT rewrites a LoRA file in '
      'another layout; MODEL is the model it was made for (a diffusers folder), which gives the '
      'module names and shapes.')
  p.add_argument('--src', required=True, help='single file, diffusers folder or Orbax folder')
  p.add_argument('--to', required=True, choices=FORMATS + LORA_LAYOUTS,
                 help='a model format, or a LoRA layout (then --src is a LoRA and --base is '
                 'needed)')
  p.add_argument('--out', required=True, help='output folder (or .safetensors file)')
  p.add_argument('--base', help='LoRA conversion (--to peft|kohya): the model the LoRA was made '
                 'for, a diffusers or Orbax folder (only its configs are read) or a single file; '
                 'its module names and shapes place the adapters')
  p.add_argument('--config', help='single file only: a diffusers folder describing the model')
  p.add_argument('--original_config', help='single file only: the original LDM YAML')
  p.add_argument('--no_ema', action='store_true', help='single file: the raw, not EMA, weights')
  p.add_argument('--prediction_type', choices=('epsilon', 'v_prediction', 'sample'))
  p.add_argument('--image_size', type=int, help='single file: the native image size in pixels')
  p.add_argument('--scaling_factor', type=float, help='single file: the VAE latent scale')
  p.add_argument('--tokenizer', help='a tokenizer folder (a single file has none); for the SDXL '
                 'refiner, its only (the second) tokenizer')
  p.add_argument('--tokenizer_2', help='SDXL: the second tokenizer folder (OpenCLIP bigG\'s)')
  p.add_argument('--dtype', choices=tuple(_FILE_DTYPES),
                 help='storage dtype of a written single file (default float32) or LoRA '
                 '(default: the source LoRA\'s)')
  return p.parse_args(argv)


def load_source(args):
  """Components from --src, with its format detected, and the summary lines about the source."""
  src = args.src
  if os.path.isfile(src):
    components, report = single_file.load(
        src, config=args.config, config_yaml=args.original_config, use_ema=not args.no_ema,
        prediction_type=args.prediction_type, image_size=args.image_size,
        scaling_factor=args.scaling_factor, tokenizer=args.tokenizer,
        tokenizer_2=args.tokenizer_2)
    return components, report.lines()
  if os.path.isfile(os.path.join(src, 'model_index.json')):
    components, kind = diffusers_lib.load_diffusers(src), 'diffusers folder'
  elif orbax_io.is_orbax_folder(src):
    components, kind = orbax_io.load_orbax(src), 'ldm_jax Orbax folder'
  else:
    raise diffusers_lib.ConversionError(
        f'{src} is neither a single file, a diffusers folder (model_index.json) nor an ldm_jax '
        f'Orbax folder ({orbax_io.INDEX})')
  refiner = components.text_encoder is None and components.text_encoder_2 is not None
  tokenizers = {'tokenizer_2' if refiner else 'tokenizer': args.tokenizer,
                'tokenizer_2': args.tokenizer_2 or (args.tokenizer if refiner else None)}
  for name, folder in tokenizers.items():
    if folder:
      components = components.replace(**{name: diffusers_lib.load_tokenizer(folder)})
  if args.prediction_type:
    components = components.replace(scheduler_config=dict(
        components.scheduler_config, prediction_type=args.prediction_type))
  return components, [f'{src}: {kind}']


def write(components, args):
  """Writes the components in the --to format; returns the paths written."""
  if args.to == 'diffusers':
    diffusers_lib.save_diffusers(components, args.out)
    return [args.out]
  if args.to == 'orbax':
    orbax_io.save_orbax(components, args.out)
    return [args.out]
  yaml_path = os.path.splitext(args.out)[0] + '.yaml'
  dtype = _FILE_DTYPES[args.dtype or 'float32']
  single_file.save_single_file(components, args.out, dtype=dtype, config_yaml=yaml_path)
  return [args.out, yaml_path]


def summary(components):
  """One line per network: class, parameter count, tensors, dtypes; then the sampling settings."""
  lines = []
  for name in ('unet', 'vae', 'text_encoder', 'text_encoder_2'):
    if getattr(components, name) is None:
      continue
    module, params = getattr(components, name)
    leaves = jax.tree.leaves(params)
    dtypes = '/'.join(sorted({str(jnp.dtype(x.dtype)) for x in leaves}))
    millions = build.count_params(params) / 1e6
    lines.append(f'  {name:13s} {type(module).__name__:22s} {millions:9.2f}M params '
                 f'({len(leaves)} tensors, {dtypes})')
  sched = components.scheduler_config
  have = lambda tok: 'yes' if tok is not None else 'none'
  tokenizers = (f'tokenizer {have(components.tokenizer)}' if components.text_encoder is not None
                else '')
  if components.text_encoder_2 is not None:
    tokenizers = ', '.join(filter(None, (tokenizers,
                                         f'tokenizer_2 {have(components.tokenizer_2)}')))
  lines.append(f'  scheduler     {sched.get("_class_name", "?")}, prediction '
               f'{sched.get("prediction_type", "epsilon")}; VAE scaling factor '
               f'{components.vae[0].config.scaling_factor}; {tokenizers}')
  if components.options:
    lines.append('  options       ' + ', '.join(f'{k}={v}' for k, v in components.options.items()))
  lines.append(f'  sample sizes  VAE {components.vae[0].config.sample_size} px, U-Net '
               f'{components.unet[0].config.sample_size} latent px')
  return lines


def lora_base(path):
  """{network: parameter tree} of the model a LoRA is for: abstract, from the configs of a
  diffusers or Orbax folder (no weights read), else a single file's loaded weights."""
  if os.path.isfile(os.path.join(path, 'model_index.json')):
    configs = {n: os.path.join(path, n, 'config.json') for n in lora_io.NETWORKS}
    configs = {n: config_io.read_json(c) for n, c in configs.items() if os.path.isfile(c)}
  elif orbax_io.is_orbax_folder(path):
    index = config_io.read_json(os.path.join(path, orbax_io.INDEX))
    configs = {n: index[n] for n in lora_io.NETWORKS if index.get(n) is not None}
  elif os.path.isfile(path):
    components, _ = single_file.load(path)
    return {n: getattr(components, n)[1] for n in lora_io.NETWORKS
            if getattr(components, n) is not None}
  else:
    raise diffusers_lib.ConversionError(
        f'--base {path} is neither a diffusers folder (model_index.json), an ldm_jax Orbax '
        f'folder ({orbax_io.INDEX}) nor a single file: pass the model the LoRA was made for')
  if 'unet' not in configs:
    raise diffusers_lib.ConversionError(f'--base {path} has no U-Net config')
  text = lambda c: text_encoder_lib.TextEncoderConfig.from_transformers(c)
  modules = {n: text_encoder_lib.CLIPTextModel(text(c)) for n, c in configs.items() if n != 'unet'}
  modules['unet'] = unet_lib.UNet2DConditionModel(
      unet_lib.UNetConfig.from_diffusers(configs['unet']))
  return {n: build.abstract_params(m) for n, m in modules.items()}


def convert_lora_file(args):
  """--src (a LoRA of any layout) rewritten in the --to layout; returns the summary lines."""
  if not args.base:
    raise diffusers_lib.ConversionError(
        f'--to {args.to} converts a LoRA and needs --base: the model it was made for (a diffusers '
        'folder, Orbax folder or single file), for its module names and shapes')
  state, _ = lora_io.read_file(args.src)
  dtypes = [v.dtype for k, v in state.items() if not k.endswith('.alpha')]
  dtype = _FILE_DTYPES[args.dtype] if args.dtype else max(set(dtypes), key=dtypes.count)
  base = lora_base(args.base)
  loaded = lora_io.load_lora(args.src, base)
  written = lora_io.save_lora(loaded.adapters, args.out, loaded.alpha, layout=args.to,
                              base=base, dtype=dtype)
  lines = [f'{args.src}: a {loaded.layout} LoRA']
  for network, adapters in loaded.adapters.items():
    mods = lora_lib.modules(adapters)
    if mods:
      ranks = sorted({lora_lib.rank_of(a) for a in mods.values()})
      alphas = sorted(set(loaded.alpha[network].values()))
      lines.append(f'  {network:15s}{len(mods):5d} modules, rank {"/".join(map(str, ranks))}, '
                   f'alpha {"/".join(f"{a:g}" for a in alphas)}')
  return lines + [f'wrote {args.to} ({np.dtype(dtype).name}): {written}']


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.to in LORA_LAYOUTS:
    try:
      print('\n'.join(convert_lora_file(args)))
    except (diffusers_lib.ConversionError, lora_io.LoraFormatError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    return 0
  try:
    components, source_lines = load_source(args)
    written = write(components, args)
  except (diffusers_lib.ConversionError, tables.WeightsMismatchError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print('\n'.join(source_lines + ['converted:'] + summary(components)))
  print(f'wrote {args.to}: {", ".join(written)}')
  if args.to != 'single_file':
    for name, network in (('tokenizer', 'text_encoder'), ('tokenizer_2', 'text_encoder_2')):
      if getattr(components, network) is not None and getattr(components, name) is None:
        print(f'note: no {name} was written; pass --{name} DIR to include one')
  return 0


if __name__ == '__main__':
  sys.exit(main())
