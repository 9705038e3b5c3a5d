"""Aspect-ratio buckets (`data.buckets`): batches of one resolution each, of about equal area.

Each record goes to the bucket nearest its aspect ratio (in log ratio), is resized to cover it
and cropped to it. A bucketed epoch is planned from (seed, epoch) alone: each bucket's records
are shuffled, cut into global batches (a bucket's last partial batch waits for the next epoch's
shuffle), and the batches shuffled; host i of n takes the i-th slice of every global batch, so
all hosts train the same bucket at the same step. The step compiles once per bucket shape met.

A record that cannot be used (it does not decode, is too small or has an empty caption that is
skipped) is replaced by the next record of its bucket's shuffled order, so that a batch stays
full and of one bucket; the replaced records are counted as skipped.

Specs:
  'auto': the area of `resolution`^2 in steps of 64 px (8 px below 256 px), sides from half to
    twice the resolution (SD's 512^2: 256x1024 ... 512x512 ... 1024x256), as kohya's trainer
    makes them.
  'sdxl': SDXL's 1024^2 set (the SDXL report, appendix: 40 resolutions from 512x2048 to
    2048x512, plus 1024x1024).
  'WxH,WxH,...': an explicit list.
"""

import logging
import os
import sys

import grain
import numpy as np

from ldm_jax.data import shards

# SDXL's training resolutions as (width, height), from the report's appendix (one orientation;
# the transposes are added).
_SDXL = ((512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728),
         (576, 1664), (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344),
         (768, 1344), (768, 1280), (832, 1216), (832, 1152), (896, 1152), (896, 1088),
         (960, 1088), (960, 1024), (1024, 1024))
SPECS = "None (off), 'auto', 'sdxl' or 'WxH,WxH,...'"
MAX_REPLACEMENTS = 16  # records tried for one slot before the data is called damaged
SIZES_FILE = 'sizes.npy'  # a precomputed dataset's record sizes, beside its dataset_info.json


def parse(spec, resolution):
  """The buckets of `spec` as a sorted tuple of (width, height), or None when off.

  Raises:
    ValueError: the spec is not one of SPECS, or a size is not a positive multiple of 8.
  """
  if spec in (None, '', 'none'):
    return None
  if not isinstance(spec, str):
    raise ValueError(f'data.buckets={spec!r}: must be {SPECS}')
  if spec == 'auto':
    sizes = _equal_area(resolution)
  elif spec == 'sdxl':
    sizes = _SDXL + tuple((h, w) for w, h in _SDXL)
  else:
    sizes = []
    for item in spec.split(','):
      parts = item.strip().lower().split('x')
      if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f'data.buckets={spec!r}: {item.strip()!r} is not WxH; must be {SPECS}')
      sizes.append((int(parts[0]), int(parts[1])))
  bad = [f'{w}x{h}' for w, h in sizes if w < 8 or h < 8 or w % 8 or h % 8]
  if bad:
    raise ValueError(f'data.buckets={spec!r}: {", ".join(bad)}: sides must be multiples of 8 '
                     '(the VAE downsamples by up to 8)')
  return tuple(sorted(set(sizes), key=lambda s: (s[0] / s[1], s)))


def _equal_area(resolution):
  """(width, height) of about resolution^2 area in 64 px steps (8 below 256), sides in
  [resolution / 2, 2 resolution]."""
  step = 64 if resolution >= 256 else 8
  area, low, high = resolution * resolution, max(step, resolution // 2), 2 * resolution
  sizes = set()
  for width in range(low - low % step, high + 1, step):
    height = min(high, area // width // step * step)
    if width >= low and height >= low:
      sizes |= {(width, height), (height, width)}
  return tuple(sizes)


def assign(sizes, buckets):
  """The bucket (index into `buckets`) nearest each (width, height) in log aspect ratio; sizes
  that are unknown (-1: the record is damaged, and replaced when read) go to the squarest."""
  sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
  ratios = np.log(np.array([w / h for w, h in buckets]))
  known = (sizes > 0).all(axis=1)
  r = np.zeros(len(sizes))
  r[known] = np.log(sizes[known, 0] / sizes[known, 1])
  return np.abs(r[:, None] - ratios[None, :]).argmin(axis=1).astype(np.int32)


def record_sizes(source, name, data_dir, image_key='image'):
  """(n, 2) int32 (width, height) of every record's image, -1 where it cannot be read.

  Shard sources keep the sizes in their index (`source.sizes()`); a precomputed dataset in its
  `sizes.npy`; other datasets' image headers are read once and cached under the index cache
  directory by the dataset's fingerprint.
  """
  if hasattr(source, 'sizes'):
    return np.asarray(source.sizes(), np.int32)
  stored = stored_sizes(name, data_dir)
  if stored is not None:
    return stored
  from ldm_jax.data import sources  # pylint: disable=g-import-not-at-top  (sources imports us)
  cache = os.path.join(shards.cache_dir(), 'sizes-' + sources.fingerprint(name, data_dir)[:32]
                       + '.npy')
  if os.path.exists(cache):
    sizes = np.load(cache)
    if len(sizes) == len(source):
      return sizes.astype(np.int32)
  logging.info('reading the image sizes of %s (%d records) for aspect-ratio buckets, once',
               name, len(source))
  sizes = np.array([_size(source[i][image_key]) for i in range(len(source))],
                   np.int32).reshape(-1, 2)
  try:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(f'{cache}.{os.getpid()}.tmp', 'wb') as f:  # several processes may write it
      np.save(f, sizes)
    os.replace(f'{cache}.{os.getpid()}.tmp', cache)
  except OSError as e:
    logging.warning('could not cache the image sizes in %s (%s): they are read at every start',
                    cache, e.strerror or e)
  return sizes


def stored_sizes(name, data_dir):
  """The `sizes.npy` a precomputed dataset keeps ((n, 2) int32 width, height), or None."""
  from ldm_jax.data import sources  # pylint: disable=g-import-not-at-top
  version_dir = sources.newest_version(name, data_dir)
  path = os.path.join(version_dir, SIZES_FILE) if version_dir else None
  return np.load(path).astype(np.int32) if path and os.path.exists(path) else None


def _size(value):
  """(width, height) of an image record value (bytes or an HWC array), EXIF orientation
  applied, from its header only; (-1, -1) when it cannot be read."""
  if isinstance(value, np.ndarray) and value.ndim == 3:
    return value.shape[1], value.shape[0]
  return shards.image_size(bytes(value))


class Plan:
  """This host's slots of the bucketed epochs, as a random-access sequence for grain.

  Element k is (bucket index, record indices to try in order): the record of slot k and the
  ones that replace it if it cannot be used. Its length covers `num_epochs` (sys.maxsize when
  None: forever); an epoch's plan is a function of (seed, epoch) only.
  """

  def __init__(self, bucket_of, num_buckets, global_batch, host, hosts, seed, shuffle,
               num_epochs=None):
    self.bucket_of = np.asarray(bucket_of, np.int32)
    self.num_buckets, self.global_batch = num_buckets, global_batch
    self.host_batch, self.host = global_batch // hosts, host
    self.seed, self.shuffle = seed, shuffle
    self.members = [np.flatnonzero(self.bucket_of == b) for b in range(num_buckets)]
    self.batches_per_epoch = sum(len(m) // global_batch for m in self.members)
    if not self.batches_per_epoch:
      largest = max(len(m) for m in self.members)
      raise ValueError(f'no aspect-ratio bucket holds a whole global batch of {global_batch} '
                       f'records ({len(self.bucket_of)} records, the fullest bucket has '
                       f'{largest}): lower data.batch_size, or use fewer buckets')
    self.per_epoch = self.batches_per_epoch * self.host_batch
    self._length = sys.maxsize if num_epochs is None else num_epochs * self.per_epoch
    self._epoch, self._order = None, None

  def __len__(self):
    return self._length

  def __getitem__(self, k):
    epoch, j = divmod(int(k), self.per_epoch)
    step, slot = divmod(j, self.host_batch)
    order, batches = self._plan(epoch)
    bucket, first = batches[step]
    position = first + self.host * self.host_batch + slot
    members = order[bucket]
    tries = min(MAX_REPLACEMENTS, len(members)) if self.host_batch > 1 else 1
    return {'bucket': bucket,
            'candidates': members[(position + np.arange(tries)) % len(members)]}

  def bucket_counts(self):
    """Records per bucket."""
    return [len(m) for m in self.members]

  def _plan(self, epoch):
    """(each bucket's records in this epoch's order, (bucket, first position) per batch)."""
    if self._epoch != epoch:
      order = [self._shuffled(m, epoch, b) for b, m in enumerate(self.members)]
      batches = [(b, i * self.global_batch) for b, m in enumerate(order)
                 for i in range(len(m) // self.global_batch)]
      if self.shuffle:
        rng = np.random.default_rng([self.seed, epoch, self.num_buckets])
        batches = [batches[i] for i in rng.permutation(len(batches))]
      else:  # in record order: by each batch's first record
        batches.sort(key=lambda bi: order[bi[0]][bi[1]])
      self._epoch, self._order = epoch, (order, batches)
    return self._order

  def _shuffled(self, members, epoch, bucket):
    if not self.shuffle:
      return members
    return np.random.default_rng([self.seed, epoch, bucket]).permutation(members)


class BucketRecord:
  """The per-slot transform with buckets: reads and processes the slot's record, or the next of
  its bucket while one cannot be used (picklable, for grain's worker processes)."""

  def __init__(self, source, process, buckets):
    self.source, self.process, self.buckets = source, process, buckets

  def __call__(self, element, rng):
    """The processed record with 'replaced' (records skipped before it, per status) and
    'replaced_problem' (the first skipped one's decode problem, or '')."""
    size = self.buckets[int(element['bucket'])]
    replaced, problem = np.zeros(self.process.num_statuses, np.int32), ''
    for index in element['candidates']:
      out = self.process(self.source[int(index)], rng, size=size)
      if out['status'] == 0 or len(element['candidates']) == 1:  # 0: pipeline.OK
        return out | {'replaced': replaced, 'replaced_problem': problem}
      replaced[out['status']] += 1
      problem = problem or out.pop('problem', '')
    raise ValueError(f'{replaced.sum()} records in a row of the {size[0]}x{size[1]} bucket cannot '
                     f'be used (the first: {problem or "skipped by the data settings"}): is the '
                     'dataset damaged? Check it, or leave the damaged shards out')


def grain_dataset(source, plan, process, buckets):
  """The planned slots as grain MapDataset of processed records (not yet batched)."""
  return grain.MapDataset.source(plan).seed(plan.seed).random_map(
      BucketRecord(source, process, buckets))
