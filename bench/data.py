"""Benchmark: examples/s of the input pipeline, in all and per host core, with 0 and N workers.

  python bench/data.py [--images 256] [--batches 20] [--batch_size 16] [--workers N]
      [--jpeg_scale 1.25] [--sources webdataset,parquet,...] [--json out.json]

Rows (each record: decode, EXIF, RGB, resize the shorter side, random crop, flip, caption
dropout, tokenize with a CLIP-format BPE built from the captions; the first batch, with the
worker start-up, is not timed):
  shapes 64 px: the shapes dataset (raw pixel records, no decoding);
  folder 512 px: a tfds image_folder build of the 512 px JPEGs (ArrayRecord);
  webdataset and parquet, 256 and 512 px: the same JPEGs as 4 tar shards and as one parquet file
    of 100-row row groups, img2dataset's two layouts, read in place (ldm_jax.data.webdataset,
    ldm_jax.data.parquet);
  precomputed 512 px: the reader of `data.precompute`'s encodings (`precomputed=True`): SD-shaped
    records, 64x64x8 float16 VAE moments (a 512 px image's) and the 77 token ids, no text
    states. They are encoded from the shapes records by a one-level random VAE (no downsampling),
    so they take seconds to make; the reader does not care what encoded them.
The bench makes its own photo-like JPEGs (gradients plus noise, quality 90) with aspect ratios
1:1, 4:3, 3:4 and 3:2 and a shorter side `--jpeg_scale` (1.25) times the resolution, so every
record is resized and cropped; 2.5 (or more) shows the larger web images, which decode at a
reduced DCT scale (ldm_jax.data.images.decode_for). `--sources` picks the rows. Per core:
examples/s divided by the CPUs this process may use (os.sched_getaffinity); N workers defaults
to that count. Per CPU s: examples per CPU second the process and its workers used (from
/proc), what one core gives when it is ours alone: on a machine shared with other work the
wall-clock columns fall, this one much less.
"""

import argparse
import glob
import io
import json
import os
import shutil
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq

from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.data import builders
from ldm_jax.data import pipeline
from ldm_jax.data import precompute
from ldm_jax.models import build
from ldm_jax.models import vae
from ldm_jax.tokenizer import build as tokenizer_build

_ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2))  # width : height
_CAPTION = 'a photo of a gradient number {} with some noise'
_SOURCES = ('shapes', 'folder', 'webdataset', 'parquet', 'precomputed')


def _jpegs(n, resolution, rng, scale=1.25):
  """n (key, JPEG bytes, caption) of photo-like images, shorter side `scale` x `resolution`."""
  side = round(scale * resolution)
  out = []
  for i in range(n):
    a, b = _ASPECTS[i % len(_ASPECTS)]
    w, h = (side * a // b, side) if a >= b else (side, side * b // a)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * rng.uniform(0.1, 0.4) + yy * rng.uniform(0.1, 0.4)
                      + rng.uniform(0, 255)) % 256 for _ in range(3)], -1)
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, 'JPEG', quality=90)
    out.append((f'{i:09d}', buf.getvalue(), _CAPTION.format(i)))
  return out


def _write_folder(root, items):
  os.makedirs(root, exist_ok=True)
  for key, data, caption in items:
    with open(os.path.join(root, f'{key}.jpg'), 'wb') as f:
      f.write(data)
    with open(os.path.join(root, f'{key}.txt'), 'w') as f:
      f.write(caption)


def _write_tars(root, items, num_shards=4):
  """img2dataset's webdataset layout: per key a .jpg, a .txt and a .json member."""
  os.makedirs(root, exist_ok=True)
  for s in range(num_shards):
    with tarfile.open(os.path.join(root, f'{s:05d}.tar'), 'w') as tar:
      for key, data, caption in items[s::num_shards]:
        for ext, payload in (('jpg', data), ('txt', caption.encode()),
                             ('json', json.dumps({'key': key, 'caption': caption}).encode())):
          info = tarfile.TarInfo(f'{key}.{ext}')
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))
  return f'webdataset:{root}/{{00000..{num_shards - 1:05d}}}.tar'


def _write_parquet(root, items):
  """img2dataset's parquet layout: key, caption, status, jpg; 100-row row groups."""
  os.makedirs(root, exist_ok=True)
  table = pa.table({'key': [k for k, _, _ in items], 'caption': [c for _, _, c in items],
                    'status': ['success'] * len(items),
                    'jpg': pa.array([d for _, d, _ in items], pa.binary())})
  pq.write_table(table, os.path.join(root, '00000.parquet'), row_group_size=100)
  return f'parquet:{root}/*.parquet'


def _cpu_seconds():
  """CPU seconds used so far by this process (all its threads) and its live children (grain's
  worker processes), from /proc."""
  t = os.times()
  total, me, tick = t.user + t.system, os.getpid(), os.sysconf('SC_CLK_TCK')
  for stat in glob.glob('/proc/[0-9]*/stat'):
    try:
      with open(stat) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:  # it ended meanwhile
      continue
    if int(fields[1]) == me:
      total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
  return total


def _rate(config, tok, batches):
  """(examples per wall-clock second, examples per CPU second of this process and its workers)."""
  loader = pipeline.Loader(config, tok)
  next(loader)  # start-up (and worker spawn) excluded
  t0, cpu0 = time.perf_counter(), _cpu_seconds()
  for _ in range(batches):
    next(loader)
  examples = batches * config.batch_size
  return examples / (time.perf_counter() - t0), examples / (_cpu_seconds() - cpu0)


def _datasets(work, args, tok):
  """[(source, resolution, data.name)] of the rows of `args.sources`, the files made under
  `work`."""
  rng = np.random.default_rng(0)
  tfds_dir = os.path.join(work, 'tfds')
  wanted = set(args.sources.split(','))
  rows = []
  if wanted & {'shapes', 'precomputed'}:
    shapes = builders.build_shapes(tfds_dir, image_size=64, num_train=2000)
    rows.append(('shapes', 64, shapes))
  for res in (256, 512) if wanted & {'folder', 'webdataset', 'parquet'} else ():
    items = _jpegs(args.images, res, rng, args.jpeg_scale)
    if res == 512:
      _write_folder(os.path.join(work, 'jpegs'), items)
      rows.append(('folder', res, builders.build_folder(os.path.join(work, 'jpegs'), tfds_dir)[0]))
    rows.append(('webdataset', res, _write_tars(os.path.join(work, f'wds{res}'), items)))
    rows.append(('parquet', res, _write_parquet(os.path.join(work, f'parquet{res}'), items)))
  if 'precomputed' in wanted:
    rows.append(('precomputed', 512, _precompute(shapes, tfds_dir, tok)))
  return [row for row in rows if row[0] in wanted]


def _precompute(shapes, data_dir, tok):
  """A precomputed dataset of 512 SD-shaped records (64x64x8 float16 moments, 77 ids), encoded
  from 64 px shapes records by a random VAE of one level (f=1, 8 channels, no attention)."""
  net = vae.AutoencoderKL(vae.VAEConfig.tiny(block_out_channels=(8,), norm_num_groups=8,
                                             mid_block_add_attention=False))
  config = pipeline.LoaderConfig(name=shapes, data_dir=data_dir, split='train[:512]',
                                 resolution=64)
  name, _ = precompute.precompute(config, tok, (net, build.random_params(net, 0)), None, data_dir,
                                  'bench', batch_size=64, dtype=np.float16)
  return name


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=256, help='JPEGs per resolution')
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--workers', type=int, default=len(os.sched_getaffinity(0)),
                      help='N: the worker processes of the rows with workers')
  parser.add_argument('--jpeg_scale', type=float, default=1.25,
                      help="the JPEGs' shorter side over the resolution")
  parser.add_argument('--sources', default=','.join(_SOURCES),
                      help=f'the rows to run, comma-separated: some of {",".join(_SOURCES)}')
  parser.add_argument('--json')
  args = parser.parse_args()
  unknown = set(args.sources.split(',')) - set(_SOURCES)
  if unknown:
    parser.error(f'unknown --sources {sorted(unknown)}; known: {",".join(_SOURCES)}')
  cores, load = len(os.sched_getaffinity(0)), os.getloadavg()[0]
  work = tempfile.mkdtemp(prefix='bench_data_')
  tok = tokenizer_lib.load_tokenizer(tokenizer_build.build_caption_tokenizer(
      [_CAPTION.format(''), 'a small red circle on a blue background in the top left corner'],
      os.path.join(work, 'tok')))
  try:
    rows = _measure(work, tok, args, cores)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  _print(rows, args, cores, load)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'cores': cores, 'load_average_before': load, 'jpeg_scale': args.jpeg_scale,
                 'rows': rows}, f, indent=2)


def _measure(work, tok, args, cores):
  """A row per (dataset, workers): examples/s, per core and per CPU second."""
  rows = []
  for source, res, name in _datasets(work, args, tok):
    for workers in (0, args.workers):
      config = pipeline.LoaderConfig(name=name, data_dir=os.path.join(work, 'tfds'),
                                     resolution=res, crop='random', flip=True,
                                     caption_dropout=0.1, batch_size=args.batch_size,
                                     worker_count=workers,
                                     precomputed=source == 'precomputed')
      rate, per_cpu_s = _rate(config, tok, args.batches)
      rows.append({'source': source, 'resolution': res, 'workers': workers,
                   'examples_per_s': rate, 'per_core': rate / cores,
                   'per_cpu_second': per_cpu_s})
      print(f'{source} {res} px, {workers} workers: {rate:.1f} examples/s', flush=True)
  return rows


def _print(rows, args, cores, load):
  print(f'\ninput pipeline, batch {args.batch_size}, {args.batches} timed batches, {cores} cores '
        f'(1-minute load average before: {load:.1f}), JPEGs {args.jpeg_scale}x the resolution')
  print(f"{'source':>11s} {'px':>4s} {'workers':>7s} {'examples/s':>10s} {'per core':>8s} "
        f"{'per CPU s':>9s}")
  for r in rows:
    print(f"{r['source']:>11s} {r['resolution']:>4d} {r['workers']:>7d} "
          f"{r['examples_per_s']:>10.1f} {r['per_core']:>8.1f} {r['per_cpu_second']:>9.1f}")


if __name__ == '__main__':
  main()
