"""Prepare datasets: `python -m ldm_jax.data build shapes|folder ...`, and encode one once with a
training config's frozen VAE (and text encoder): `python -m ldm_jax.data precompute --config
configs/sd15.py --config.init=/models/sd15 --out DATA_DIR --name NAME` (see --help)."""

import argparse
import os
import sys

from ldm_jax.data import builders
from ldm_jax.data import shapes as shapes_lib


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m ldm_jax.data', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  build = sub.add_parser('build', help='build a dataset into --data_dir')
  kinds = build.add_subparsers(dest='kind', required=True)
  shapes = kinds.add_parser('shapes', help='the synthetic captioned shapes dataset')
  shapes.add_argument('--data_dir', required=True)
  shapes.add_argument('--image_size', type=int, default=32)
  shapes.add_argument('--num_train', type=int, default=2000)
  shapes.add_argument('--num_holdout', type=int, default=200)
  shapes.add_argument('--seed', type=int, default=0)
  shapes.add_argument('--layout', default='scattered', choices=shapes_lib.LAYOUTS,
                      help='scattered: nine positions, some two-object images; centered: one '
                           'object at the center')
  folder = kinds.add_parser('folder', help='a folder of images with captions')
  folder.add_argument('--src', required=True, help='metadata.jsonl / metadata.csv / name.txt')
  folder.add_argument('--data_dir', required=True)
  folder.add_argument('--keep_empty_captions', action='store_true')
  folder.add_argument('--overwrite', action='store_true',
                      help='replace a dataset of the same name built from another folder')
  folder.add_argument('--name', help="the dataset's name (default: the folder's name)")
  _add_precompute(sub)
  args, overrides = parser.parse_known_args(argv)
  if args.command == 'precompute':
    _precompute(parser, args, overrides)
  elif overrides:
    parser.error(f'unrecognized arguments: {" ".join(overrides)}')
  else:
    _build(args)


def _build(args):
  """The `build` command."""
  if args.kind == 'shapes':
    name = builders.build_shapes(args.data_dir, args.image_size, args.num_train,
                                 args.num_holdout, args.seed, args.layout)
    print(f'built {name} in {args.data_dir}: splits train ({args.num_train}), holdout '
          f'({args.num_holdout}); train with --config.data.name={name}')
  else:
    try:
      name, summary = builders.build_folder(args.src, args.data_dir, args.keep_empty_captions,
                                            overwrite=args.overwrite, name=args.name)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
      sys.exit(f'error: {e}')
    verb = '' if summary.startswith('already built') else 'built '
    print(f'{verb}{name} in {args.data_dir}: {summary}; train with --config.data.name={name}')


def _add_precompute(sub):
  """The `precompute` command's flags (`--config.a.b=v` overrides come on top)."""
  pre = sub.add_parser(
      'precompute', help="encode a training config's dataset with its frozen VAE (and text "
      'encoder) into DATA_DIR/precomputed/NAME', description='Encodes the `data` group of a '
      "training config (name, data_dir, split, resolution, buckets, max_length, keys) with the "
      'frozen networks its ldm stage uses (config.init, or config.vae_workdir and '
      'text_encoder.workdir), sharded over all processes and devices; a rerun resumes after a '
      'kill. Override config values with --config.a.b=value.')
  pre.add_argument('--config', required=True, help='a training config, path.py[:arg]')
  pre.add_argument('--out', required=True, help='the data_dir to write precomputed/NAME into')
  pre.add_argument('--name', required=True, help='the dataset name (read as precomputed/NAME)')
  pre.add_argument('--dtype', default='float32', choices=('float32', 'float16'),
                   help='storage dtype of the moments and text states (float16: half the size)')
  pre.add_argument('--batch_size', type=int, help='records per encoding call on each process, '
                   'a multiple of its devices (default: 8 per local device)')
  pre.add_argument('--shard_size', type=int, help='source records per output shard, the '
                   'unit a rerun resumes from (default 1024)')
  pre.add_argument('--text_encoder', action=argparse.BooleanOptionalAction,
                   help="store the text encoder's states (default: when the config's text "
                        'encoder is frozen; a trained one cannot be stored)')


def _precompute(parser, args, overrides):
  """The `precompute` command: encodes, then prints the flags that train from the result."""
  # pylint: disable=g-import-not-at-top  (JAX and the models: not for `build`)
  from absl import flags
  from absl import logging as absl_logging
  import numpy as np
  from ldm_jax import cli_logging
  from ldm_jax import distributed
  from ldm_jax import weights
  from ldm_jax.data import pipeline
  from ldm_jax.data import precompute
  config = _load_config(parser, args.config, overrides)
  flags.FLAGS.mark_as_parsed()  # absl's logging reads its flags; this command parses its own
  absl_logging.use_absl_handler()  # INFO (the progress lines) to stderr, as under absl's app.run
  cli_logging.setup()
  distributed.initialize(config.distributed)
  frozen_text = not config.text_encoder.trainable
  store_text = frozen_text if args.text_encoder is None else args.text_encoder
  if store_text and not frozen_text:
    sys.exit('error: --text_encoder: the config trains its text encoder '
             '(text_encoder.trainable=True), so its states change in training and cannot be '
             'stored; leave the flag out, or add --config.text_encoder.trainable=False')
  try:
    data = pipeline.LoaderConfig.from_config(config.data)
    if data.precomputed:
      raise ValueError(f'data.name={data.name!r} is precomputed already (data.precomputed=True)')
    tok = weights.tokenizer(config)
    weights.fill_vocab_size(config, tok)
    w = weights.ldm_weights(config, train_text=not store_text)  # loads the text weights if kept
    text = (w.text_encoder, w.frozen['text_encoder']) if store_text else None
    name, stats = precompute.precompute(
        data, tok, (w.vae, w.frozen['vae']), text, args.out, args.name,
        batch_size=args.batch_size, dtype=np.dtype(args.dtype),
        shard_size=args.shard_size or precompute.SHARD_SIZE)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  if distributed.is_main():
    counts = ', '.join(f'{k} {v}' for k, v in stats.items() if v) or 'encoded before'
    latents = ' --config.precompute_latents=False' if config.get('precompute_latents') else ''
    print(f'{name} in {args.out} ({counts}); train from it with --config.data.name={name} '
          f'--config.data.data_dir={args.out} --config.data.precomputed=True{latents}')


def _load_config(parser, spec, overrides):
  """The training config `spec` ('path.py[:arg]') with `--config.a.b=value` overrides."""
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from ml_collections import config_flags
  from ldm_jax import config_check
  bad = [o for o in overrides if not (o.startswith('--config.') and '=' in o)]
  if bad:
    parser.error(f'unrecognized arguments: {" ".join(bad)} (config overrides are written '
                 '--config.a.b=value)')
  # Configs import their siblings (`from configs import common`), which train.py, beside
  # configs/, finds on its own path: so does this command, from any working directory.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(spec.partition(':')[0]))))
  problem = config_check.startup_problem(['--config', spec, *overrides])
  if problem:
    sys.exit(f'error: {problem}')
  values, argv = flags.FlagValues(), ['precompute', f'--config={spec}', *overrides]
  config_flags.DEFINE_config_file('config', spec, flag_values=values, lock_config=True,
                                  sys_argv=argv)  # the overrides' flags are defined from argv
  values(argv)
  return values.config


if __name__ == '__main__':
  main()
