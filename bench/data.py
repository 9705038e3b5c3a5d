"""Benchmark: examples/s of the input pipeline, in all and per host core, with 0 and N workers.

  python bench/data.py [--images 256] [--batches 20] [--batch_size 16] [--workers N]
      [--json out.json]

Rows (each record: decode, EXIF, RGB, resize the shorter side, random crop, flip, caption
dropout, tokenize with a CLIP-format BPE built from the captions; the first batch, with the
worker start-up, is not timed):
  shapes 64 px: the shapes dataset (raw pixel records, no decoding);
  folder 512 px: a tfds image_folder build of the 512 px JPEGs (ArrayRecord);
  webdataset and parquet, 256 and 512 px: the same JPEGs as 4 tar shards and as one parquet file
    of 100-row row groups, img2dataset's two layouts, read in place (ldm_jax.data.webdataset,
    ldm_jax.data.parquet).
The bench makes its own photo-like JPEGs (gradients plus noise, quality 90) with aspect ratios
1:1, 4:3, 3:4 and 3:2 and a shorter side 1.25x the resolution, so every record is resized and
cropped. Per core: examples/s divided by the CPUs this process may use (os.sched_getaffinity); N
workers defaults to that count. Per CPU s: examples per CPU second the process and its workers
used (from /proc), what one core gives when it is ours alone: on a machine shared with other
work the wall-clock columns fall, this one much less.
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
from ldm_jax.tokenizer import build as tokenizer_build

_ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2))  # width : height
_CAPTION = 'a photo of a gradient number {} with some noise'


def _jpegs(n, resolution, rng):
  """n (key, JPEG bytes, caption) of photo-like images, shorter side 1.25x `resolution`."""
  side = round(1.25 * resolution)
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


def _datasets(work, num_images):
  """[(source, resolution, data.name)] of every row, the files made under `work`."""
  rng = np.random.default_rng(0)
  tfds_dir = os.path.join(work, 'tfds')
  rows = [('shapes', 64, builders.build_shapes(tfds_dir, image_size=64, num_train=2000))]
  for res in (256, 512):
    items = _jpegs(num_images, res, rng)
    if res == 512:
      _write_folder(os.path.join(work, 'jpegs'), items)
      rows.append(('folder', res, builders.build_folder(os.path.join(work, 'jpegs'), tfds_dir)[0]))
    rows.append(('webdataset', res, _write_tars(os.path.join(work, f'wds{res}'), items)))
    rows.append(('parquet', res, _write_parquet(os.path.join(work, f'parquet{res}'), items)))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=256, help='JPEGs per resolution')
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--workers', type=int, default=len(os.sched_getaffinity(0)),
                      help='N: the worker processes of the rows with workers')
  parser.add_argument('--json')
  args = parser.parse_args()
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
      json.dump({'cores': cores, 'load_average_before': load, 'rows': rows}, f, indent=2)


def _measure(work, tok, args, cores):
  """A row per (dataset, workers): examples/s, per core and per CPU second."""
  rows = []
  for source, res, name in _datasets(work, args.images):
    for workers in (0, args.workers):
      config = pipeline.LoaderConfig(name=name, data_dir=os.path.join(work, 'tfds'),
                                     resolution=res, crop='random', flip=True,
                                     caption_dropout=0.1, batch_size=args.batch_size,
                                     worker_count=workers)
      rate, per_cpu_s = _rate(config, tok, args.batches)
      rows.append({'source': source, 'resolution': res, 'workers': workers,
                   'examples_per_s': rate, 'per_core': rate / cores,
                   'per_cpu_second': per_cpu_s})
      print(f'{source} {res} px, {workers} workers: {rate:.1f} examples/s', flush=True)
  return rows


def _print(rows, args, cores, load):
  print(f'\ninput pipeline, batch {args.batch_size}, {args.batches} timed batches, {cores} cores '
        f'(1-minute load average before: {load:.1f})')
  print(f"{'source':>10s} {'px':>4s} {'workers':>7s} {'examples/s':>10s} {'per core':>8s} "
        f"{'per CPU s':>9s}")
  for r in rows:
    print(f"{r['source']:>10s} {r['resolution']:>4d} {r['workers']:>7d} "
          f"{r['examples_per_s']:>10.1f} {r['per_core']:>8.1f} {r['per_cpu_second']:>9.1f}")


if __name__ == '__main__':
  main()
