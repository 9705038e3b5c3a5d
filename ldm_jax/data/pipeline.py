"""The training input pipeline: tfds data source -> grain -> batches of images and token ids.

Per record (in worker processes when `worker_count > 0`): decode, EXIF-orient, RGB, resize the
shorter side, center or random crop, random flip, scale to [-1, 1], caption dropout, tokenize to
`max_length` with truncation. In the main process: count what was skipped or truncated, drop bad
records, batch. Records are sharded by host before a deterministic per-epoch shuffle; the
iterator's state (grain's plus our counters) checkpoints and restores exactly.
"""

import dataclasses
import json
import logging

from absl import flags
from etils import epath
import grain
import jax
import numpy as np
from PIL import Image

from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.data import buckets as buckets_lib
from ldm_jax.data import builders
from ldm_jax.data import images
from ldm_jax.data import sources

OK, BAD_IMAGE, TOO_SMALL, EMPTY_CAPTION = range(4)
_STATUS_NAMES = ('ok', 'skipped_bad_image', 'skipped_too_small', 'skipped_empty_caption')
# Images upsampled more than this (shorter side < resolution / 4) are counted and warned about.
UPSAMPLE_WARN = 4
_WARN_FIRST = 5  # each kind of data problem is logged this many times, then only counted
_CROPS = ('center', 'random')
PRECOMPUTED_INPUTS = 'inputs.json'  # a precomputed dataset's record of what it encodes


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  """What to read and how (the training config's `data` group)."""
  name: str  # as `sources.data_source` takes it
  data_dir: str
  split: str = 'train'
  image_key: str = 'image'  # record keys, for datasets prepared by others (coco_captions, ...)
  caption_key: str = 'caption'
  resolution: int = 32
  crop: str = 'center'  # 'center' or 'random'
  flip: bool = False  # random horizontal flip
  caption_dropout: float = 0.0  # probability of the empty caption (classifier-free guidance)
  batch_size: int = 8  # global: each of N hosts reads batch_size / N
  seed: int = 0
  num_epochs: int | None = None  # None: repeat forever
  shuffle: bool = True
  worker_count: int = 0  # grain worker processes (0: decode in the main process)
  prefetch: int = 2  # batches made and placed on the devices ahead of the step (data.prefetch)
  read_threads: int | None = None  # grain's reading threads; None: see Loader
  min_image_size: int = 0  # skip images whose shorter side is smaller (0: upsample them)
  skip_empty_captions: bool = False  # else they train the unconditional model
  max_length: int = 77  # tokens, the text encoder's context
  precomputed: bool = False  # records hold VAE moments (data.precompute), not images
  buckets: str | None = None  # aspect-ratio buckets (buckets.SPECS); None: squares of resolution

  def __post_init__(self):
    problems = _value_problems(dataclasses.asdict(self))
    if problems:
      raise ValueError('bad data config: ' + '; '.join(problems))

  @classmethod
  def problems(cls, data_config, **overrides):
    """Everything wrong with an ml_collections `data` group (or dict), without raising.

    Returns:
      A list of messages, one per unknown key (naming the valid ones) or bad value
      ('data.batch_size=0: must be an integer >= 1'); empty when `from_config` would succeed.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    raw = dict(data_config) | overrides
    unknown = sorted(set(raw) - set(fields))
    if unknown:
      return [f'unknown data config keys {unknown}; valid keys: {sorted(fields)}']
    missing = sorted(k for k, f in fields.items()
                     if k not in raw and f.default is dataclasses.MISSING)
    if missing:
      return [f'data config needs {missing}']
    defaults = {k: f.default for k, f in fields.items() if f.default is not dataclasses.MISSING}
    return _value_problems(defaults | raw)

  @classmethod
  def from_config(cls, data_config, **overrides):
    """From an ml_collections `data` group.

    Raises:
      ValueError: unknown keys (listing the valid ones) or bad values (as `problems` lists).
    """
    problems = cls.problems(data_config, **overrides)
    if problems:
      raise ValueError('bad data config: ' + '; '.join(problems))
    return cls(**(dict(data_config) | overrides))


def _value_problems(v):
  """LoaderConfig values (a dict) that are out of range, as 'data.<key>=<value>: must be ...'."""
  def is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
  checks = [
      ('name', isinstance(v['name'], str) and bool(v['name']), 'a dataset name (shapes/..., '
       'image_folder/<name>, precomputed/<name>, webdataset:<pattern>, parquet:<pattern> or a '
       'tfds name)'),
      ('batch_size', is_int(v['batch_size']) and v['batch_size'] >= 1, 'an integer >= 1'),
      ('resolution', is_int(v['resolution']) and v['resolution'] >= 8, 'an integer >= 8'),
      ('crop', v['crop'] in _CROPS, f'one of {_CROPS}'),
      ('caption_dropout', isinstance(v['caption_dropout'], (int, float))
       and 0 <= v['caption_dropout'] <= 1, 'a probability in [0, 1]'),
      ('num_epochs', v['num_epochs'] is None or (is_int(v['num_epochs']) and v['num_epochs'] >= 1),
       'None (repeat forever) or an integer >= 1'),
      ('worker_count', is_int(v['worker_count']) and v['worker_count'] >= 0,
       'an integer >= 0 (0: decode in the main process)'),
      ('read_threads', v['read_threads'] is None or (is_int(v['read_threads'])
                                                     and v['read_threads'] >= 0),
       'None (16 for images, 0 for precomputed records) or an integer >= 0'),
      ('prefetch', is_int(v['prefetch']) and v['prefetch'] >= 0,
       'an integer >= 0 (batches made ahead of the step in a thread; 0: none)'),
      ('min_image_size', is_int(v['min_image_size']) and v['min_image_size'] >= 0,
       'an integer >= 0 (0: keep every size)'),
      ('max_length', is_int(v['max_length']) and v['max_length'] >= 2,
       'an integer >= 2 (room for the start and end tokens)'),
  ]
  problems = [f'data.{key}={v[key]!r}: must be {valid}' for key, ok, valid in checks if not ok]
  if not problems:
    try:
      buckets_lib.parse(v['buckets'], v['resolution'])
    except ValueError as e:
      problems.append(str(e))
  return problems


def decode_image(value):
  """An image record value (encoded bytes or an HWC uint8 array) as an RGB PIL image.

  16-bit and float images are scaled, not clipped, and transparency is composited on white
  (`images.to_rgb` has the rules).

  Raises:
    One of `images.DECODE_ERRORS`: the bytes are not a complete image Pillow can read.
  """
  return images.decode(value)


class ProcessRecord:
  """The per-record transform (picklable, so grain workers can run it)."""
  num_statuses = len(_STATUS_NAMES)

  def __init__(self, config, tokenizer, keep_captions=False, stored_ids=False):
    self.config, self.tokenizer, self.keep_captions = config, tokenizer, keep_captions
    self.stored_ids = stored_ids  # precomputed records' input_ids are this tokenizer's
    self._empty_ids = None

  def _tokenize(self, caption, drop):
    ids, truncated = tokenizer_lib.tokenize(self.tokenizer, '' if drop else caption,
                                            self.config.max_length)
    return {'input_ids': ids[0], 'truncated': bool(truncated[0])}

  def _ids(self, record, drop):
    """A precomputed record's token ids: stored (tokenized when it was encoded; its long captions
    were counted then) or tokenized now; the empty caption's when dropped."""
    if not self.stored_ids:
      return self._tokenize(as_text(record['caption']), drop)
    if drop:
      if self._empty_ids is None:
        self._empty_ids = self._tokenize('', True)['input_ids']
      return {'input_ids': self._empty_ids, 'truncated': False}
    return {'input_ids': np.asarray(record['input_ids'], np.int32), 'truncated': False}

  def __call__(self, record, rng, size=None):
    """The record as a training example; `size` (width, height) is its bucket (None: a square
    of `resolution`)."""
    c = self.config
    drop = bool(rng.random() < c.caption_dropout)
    if c.precomputed:
      out = {'moments': record['moments'], 'drop': drop, 'status': OK, 'truncated': False,
             'small_side': 0}
      for key in ('context', 'original_size', 'crop_top_left'):  # when the encoding stored them
        if key in record:  # context: a frozen text encoder's (the step swaps dropped ones)
          out[key] = record[key]
      if self.tokenizer is not None and 'caption' in record:
        out |= self._ids(record, drop)
      return out
    caption = as_text(record[c.caption_key])
    width, height = size or (c.resolution, c.resolution)
    out = {'image': np.zeros((height, width, 3), np.uint8),
           'input_ids': np.zeros((c.max_length,), np.int32), 'drop': drop, 'status': OK,
           'truncated': False, 'small_side': 0, 'original_size': np.zeros(2, np.int32),
           'crop_top_left': np.zeros(2, np.int32)}
    if self.keep_captions:
      out['caption'] = caption
    if c.skip_empty_captions and not caption.strip():
      return out | {'status': EMPTY_CAPTION}
    try:
      img, original = images.decode_for(record[c.image_key], width, height)
    except images.DECODE_ERRORS as e:
      # Only skipped records carry a 'problem' (the counter logs it; batches never see it).
      return out | {'status': BAD_IMAGE,
                    'problem': f'{_record_name(record)}: {images.describe(e)}'}
    if min(original) < c.min_image_size:
      return out | {'status': TOO_SMALL}
    if min(original) * UPSAMPLE_WARN < min(width, height):
      out['small_side'] = min(original)
    out['original_size'] = np.array(original[::-1], np.int32)  # (height, width), as SDXL's
    img, (top, left), (_, resized_width) = images.fit(img, width, height, c.crop, rng)
    if c.flip and rng.random() < 0.5:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
      left = resized_width - width - left  # where the crop lies in the flipped image
    out['crop_top_left'] = np.array((top, left), np.int32)
    # uint8 until the batch is formed: 4x less to move between worker processes.
    return out | {'image': np.asarray(img, np.uint8)} | self._tokenize(caption, drop)


def as_text(value):
  """A record's text value (bytes or str) as str."""
  return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)


def _record_name(record):
  """The record's file name when the dataset stores one (our folder datasets do)."""
  return as_text(record['file_name']) if 'file_name' in record else 'a record without file_name'


class Counter:
  """Main-process filter: counts every record's fate, keeps the good ones, logs the first few
  problems of each kind."""

  def __init__(self, resolution):
    self.resolution = resolution
    self.stats = self.empty()

  @staticmethod
  def empty():
    return {name: 0 for name in _STATUS_NAMES} | {
        'truncated_captions': 0, 'dropped_captions': 0, 'upsampled_small': 0}

  def __call__(self, record):
    status = int(record['status'])
    self._count(status, record.get('problem'))
    if 'replaced' in record:  # buckets: records skipped before this one took their slot
      for skipped, n in enumerate(record['replaced']):
        for _ in range(int(n)):
          self._count(skipped, record['replaced_problem'])
    if status == OK:
      self.stats['truncated_captions'] += int(record['truncated'])
      self.stats['dropped_captions'] += int(record['drop'])
      if record['truncated'] and self.stats['truncated_captions'] <= _WARN_FIRST:
        logging.warning('a caption is longer than the text encoder\'s context and was truncated '
                        '(%d so far; counted in the loader stats)',
                        self.stats['truncated_captions'])
      side = int(record['small_side'])
      if side:
        self.stats['upsampled_small'] += 1
        if self.stats['upsampled_small'] <= _WARN_FIRST:
          logging.warning('an image with a %d px shorter side was upsampled %.0fx to %d px (%d so '
                          'far; counted as upsampled_small in the loader stats); set '
                          'data.min_image_size (e.g. %d) to skip such images', side,
                          self.resolution / side, self.resolution, self.stats['upsampled_small'],
                          -(-self.resolution // UPSAMPLE_WARN))
    return status == OK

  def _count(self, status, problem):
    name = _STATUS_NAMES[status]
    self.stats[name] += 1
    if status == BAD_IMAGE and self.stats[name] <= _WARN_FIRST:
      logging.warning('skipped an image that does not decode: %s (%d so far; counted as %s in '
                      'the loader stats)', problem, self.stats[name], name)


class Loader:
  """Batches for this host, forever (or `num_epochs`), with a checkpointable position.

  `next(loader)` is a dict of numpy arrays: 'image' (b, H, W, 3) float32 in [-1, 1] (H = W =
  resolution, or one bucket's size per batch with `data.buckets`), 'original_size' (b, 2) and
  'crop_top_left' (b, 2) int32 (height, width of the stored image; top, left of the crop in the
  resized image: SDXL's size conditioning) and 'input_ids' (b, max_length) int32, or 'moments'
  (and 'context', 'original_size', 'crop_top_left' if stored, 'input_ids' given a tokenizer)
  when precomputed, plus 'drop' (b,) bool (the caption was dropped) and, with `keep_captions`,
  'caption' (b,) str. b = batch_size / process_count.
  """

  def __init__(self, config, tokenizer=None, process_index=None, process_count=None,
               keep_captions=False):
    self.config = config
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if config.batch_size % count:
      raise ValueError(f'global batch {config.batch_size} is not divisible by {count} hosts')
    if tokenizer is None and not config.precomputed:
      raise ValueError('a tokenizer is needed to tokenize captions')
    source = sources.data_source(config.name, config.split, config.data_dir,
                                 image_key=config.image_key, caption_key=config.caption_key)
    self._process = ProcessRecord(config, tokenizer, keep_captions,
                                  stored_ids=_stored_ids_match(config, tokenizer))
    self.buckets = None  # the (width, height) of each bucket, with data.buckets
    if config.buckets:
      self.buckets, ds = _bucketed(config, source, self._process, index, count)
    else:
      _check_one_shape(config)
      ds = grain.MapDataset.source(source)[index::count]  # this host's records, disjoint
      ds = ds.seed(config.seed)
      if config.shuffle:
        ds = ds.shuffle()  # reshuffled each epoch by repeat()
      ds = ds.repeat(config.num_epochs).random_map(self._process)
    it = ds.to_iter_dataset(read_options(config, config.batch_size // count))
    if config.worker_count > 0:
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (parsed under app.run)
        flags.FLAGS.mark_as_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    self._counter = Counter(config.resolution)
    it = it.filter(self._counter).batch(config.batch_size // count, drop_remainder=True)
    self._iterator = iter(it)

  @property
  def stats(self):
    return dict(self._counter.stats)

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iterator)
    for key in ('status', 'truncated', 'small_side', 'replaced', 'replaced_problem'):
      batch.pop(key, None)
    if 'image' in batch:  # to [-1, 1], in place: the same values at half the host's time
      image = batch['image'].astype(np.float32)
      image /= 127.5
      image -= 1.0
      batch['image'] = image
    return batch

  def get_state(self):
    """A JSON-serialisable position: grain's iterator state and our counters."""
    return {'grain': json.loads(_to_json(self._iterator.get_state())), 'stats': self.stats}

  def set_state(self, state):
    self._iterator.set_state(state['grain'])
    self._counter.stats = Counter.empty() | dict(state['stats'])  # older states lack some keys


def _bucketed(config, source, process, index, count):
  """(the buckets, this host's planned records, processed) for `data.buckets` (buckets.py)."""
  if config.precomputed and buckets_lib.stored_sizes(config.name, config.data_dir) is None:
    raise ValueError(f'{config.name} in {config.data_dir} keeps no {buckets_lib.SIZES_FILE} '
                     '(it was encoded by an older version): encode it again with `python -m '
                     'ldm_jax.data precompute`, or train from it without data.buckets')
  sizes = buckets_lib.record_sizes(source, config.name, config.data_dir, config.image_key)
  if config.precomputed:  # encoded at their buckets: the latents' shapes are the buckets
    buckets = tuple(sorted({(int(w), int(h)) for w, h in sizes}))
    bucket_of = np.array([buckets.index((int(w), int(h))) for w, h in sizes], np.int32)
  else:
    buckets = buckets_lib.parse(config.buckets, config.resolution)
    bucket_of = buckets_lib.assign(sizes, buckets)
  plan = buckets_lib.Plan(bucket_of, len(buckets), config.batch_size, index, count, config.seed,
                          config.shuffle, config.num_epochs)
  used = [f'{w}x{h}: {n}' for (w, h), n in zip(buckets, plan.bucket_counts()) if n]
  logging.info('aspect-ratio buckets (records per bucket): %s; %d global batches per epoch',
               ', '.join(used), plan.batches_per_epoch)
  return buckets, buckets_lib.grain_dataset(source, plan, process, buckets)


def _check_one_shape(config):
  """Raises when a precomputed dataset holds latents of several shapes (it was encoded with
  buckets) and `data.buckets` is off: its batches could not be stacked."""
  sizes = buckets_lib.stored_sizes(config.name, config.data_dir) if config.precomputed else None
  kinds = 0 if sizes is None else len(np.unique(sizes, axis=0))
  if kinds > 1:
    raise ValueError(f'{config.name} was encoded with aspect-ratio buckets ({kinds} '
                     "image sizes): set data.buckets (e.g. 'auto'; the latents' own sizes are "
                     'used) to train from it')


def _stored_ids_match(config, tokenizer):
  """Whether a precomputed dataset's stored token ids are what `tokenizer` makes at
  `max_length` (its inputs record says which tokenizer encoded it): then they are used as they
  are, which halves the input's work per record (bench/NOTES.md, "The training loop")."""
  if not config.precomputed or tokenizer is None:
    return False
  version_dir = sources.newest_version(config.name, config.data_dir)
  inputs = (builders.read_record(epath.Path(version_dir) / PRECOMPUTED_INPUTS)
            if version_dir else None) or {}
  return (inputs.get('tokenizer') == tokenizer_lib.digest(tokenizer)
          and inputs.get('loader', {}).get('max_length') == config.max_length)


def read_options(config, batch_size):
  """grain's reading threads and buffer: threads decode images in parallel (Pillow releases the
  GIL); a precomputed record is only read and copied, and a thread pool's bookkeeping would cost 3x
  the reading itself. The buffer holds two batches: grain's default of 500 records costs 2x the
  work of small records in bookkeeping (bench/NOTES.md, "The training loop"), and the loop's input
  thread already runs ahead of the step."""
  threads = config.read_threads
  if threads is None:
    threads = 0 if config.precomputed else 16
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(2 * batch_size, threads) if threads else 0)


def _to_json(state):
  return json.dumps(state, default=lambda b: b.decode() if isinstance(b, bytes) else str(b))
