"""Prepare datasets: `python -m ldm_jax.data build shapes|folder ...` (see --help)."""

import argparse
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
  args = parser.parse_args(argv)

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


if __name__ == '__main__':
  main()
