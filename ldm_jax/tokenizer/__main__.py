"""The tokenizer command line: builds CLIP BPE tokenizer folders offline.

    python -m ldm_jax.tokenizer build-clip --out tokenizers/clip [--wheel_dir DIR]

writes the 49408-token CLIP vocabulary, built from the open-clip-torch wheel on PyPI.
"""

import argparse

from ldm_jax import tokenizer
from ldm_jax.tokenizer import build


def main(argv=None):
  """`python -m ldm_jax.tokenizer build-clip --out DIR [--wheel_dir DIR]`."""
  parser = argparse.ArgumentParser(prog='python -m ldm_jax.tokenizer',
                                   description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True)
  clip = commands.add_parser('build-clip', help='build the 49408-token CLIP tokenizer from PyPI')
  clip.add_argument('--out', required=True, help='the tokenizer folder to write')
  clip.add_argument('--wheel_dir', default=None, help='where to keep the open-clip-torch wheel')
  args = parser.parse_args(argv)
  out = build.build_clip_tokenizer(args.out, args.wheel_dir)
  print(f'CLIP tokenizer ({len(tokenizer.load_tokenizer(out))} tokens) in {out}')


if __name__ == '__main__':
  main()
