"""Benchmark: examples/s of the input pipeline at 64x64 and 512x512, with 0 and 2 workers.

  python bench/data.py [--batches 20] [--json out.json]

64x64: the shapes dataset (raw pixel records, no decoding). 512x512: a folder of 640x512 JPEGs
(decode, resize the shorter side, crop, flip, tokenize). Both tokenize with a CLIP-format BPE
tokenizer built from the captions (ldm_jax.tokenizer.build.build_caption_tokenizer).
"""

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.data import builders
from ldm_jax.data import pipeline
from ldm_jax.tokenizer import build as tokenizer_build


def _jpeg_folder(root, n, rng):
  """n photo-like 640x512 JPEGs (smooth gradients plus noise) with sidecar captions."""
  os.makedirs(root, exist_ok=True)
  yy, xx = np.mgrid[0:512, 0:640]
  for i in range(n):
    base = np.stack([(xx * rng.uniform(0.1, 0.4) + yy * rng.uniform(0.1, 0.4) + rng.uniform(0, 255))
                     % 256 for _ in range(3)], -1)
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, 'JPEG', quality=90)
    with open(os.path.join(root, f'{i:04d}.jpg'), 'wb') as f:
      f.write(buf.getvalue())
    with open(os.path.join(root, f'{i:04d}.txt'), 'w') as f:
      f.write(f'a photo of a gradient number {i} with some noise')


def _rate(config, tok, batches):
  loader = pipeline.Loader(config, tok)
  next(loader)  # start-up (and worker spawn) excluded
  t0 = time.perf_counter()
  for _ in range(batches):
    next(loader)
  return batches * config.batch_size / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--json')
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix='bench_data_')
  rng = np.random.default_rng(0)
  shapes_name = builders.build_shapes(os.path.join(work, 'tfds'), image_size=64, num_train=2000)
  _jpeg_folder(os.path.join(work, 'jpegs'), 200, rng)
  folder_name, _ = builders.build_folder(os.path.join(work, 'jpegs'), os.path.join(work, 'tfds'))
  captions = ['a photo of a gradient number with some noise', 'a small red circle on a blue '
              'background in the top left corner']
  tok = tokenizer_lib.load_tokenizer(
      tokenizer_build.build_caption_tokenizer(captions, os.path.join(work, 'tok')))
  rows = []
  for name, res in ((shapes_name, 64), (folder_name, 512)):
    for workers in (0, 2):
      config = pipeline.LoaderConfig(name=name, data_dir=os.path.join(work, 'tfds'),
                                     resolution=res, crop='random', flip=True,
                                     caption_dropout=0.1, batch_size=args.batch_size,
                                     worker_count=workers)
      rows.append({'resolution': res, 'workers': workers,
                   'examples_per_s': _rate(config, tok, args.batches)})
  print(f"input pipeline, batch {args.batch_size}, {os.cpu_count()} CPUs")
  print(f"{'resolution':>10s} {'workers':>8s} {'examples/s':>11s}")
  for r in rows:
    print(f"{r['resolution']:>10d} {r['workers']:>8d} {r['examples_per_s']:>11.1f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
