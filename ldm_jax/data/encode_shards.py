"""The encoding work of `precompute`: this process's shards, their records decoded in threads
and encoded in jitted batches split over the process's devices, with a progress line."""

import datetime
import logging
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import pipeline

P = jax.sharding.PartitionSpec
_PROGRESS_EVERY_S = 10.0


def encode(job, batch_size, process_index, process_count, devices=None, pad_to_batch=True):
  """Encodes and writes the unfinished shards of `job` that are this process's (p, p + P, ...).

  Args:
    job: a `precompute.Job` (its `start` has run).
    batch_size: records per encoding call; a multiple of the devices.
    process_index, process_count: which shards are this process's.
    devices: the devices each batch is split over (default: this process's).
    pad_to_batch: pad partial batches to `batch_size` (one compile per shape), else to a
      multiple of the devices.

  Returns:
    The loader stats of the source records it encoded ('ok', 'skipped_bad_image', ...).

  Raises:
    ValueError: `batch_size` is not a multiple of the devices.
  """
  devices = list(devices or jax.local_devices())
  if batch_size < 1 or batch_size % len(devices):
    raise ValueError(f'precompute batch_size {batch_size} is not a positive multiple of the '
                     f'{len(devices)} local devices: use e.g. {8 * len(devices)}')
  counter = pipeline.Counter(job.config.resolution)
  done = set(job.finished_shards())
  mine = [k for k in range(process_index, job.num_shards, process_count) if k not in done]
  kept = len(range(process_index, job.num_shards, process_count)) - len(mine)
  total = sum(end - start for start, end in map(job.shard_range, mine))
  logging.info('%s: process %d of %d encodes %d shards (%d records)%s', job.dataset_name,
               process_index, process_count, len(mine), total,
               f'; {kept} of its shards were done before' if kept else '')
  if not mine:
    return counter.stats
  encoder = Encoder(job, devices, batch_size if pad_to_batch else len(devices))
  read, progress = _Read(job), Progress(job.dataset_name, total)
  for k in mine:
    _encode_shard(job, k, encoder, read, counter, progress, batch_size)
  progress.log()
  return counter.stats


def _encode_shard(job, k, encoder, read, counter, progress, batch_size):
  """Encodes shard k: records grouped by shape into batches, written in source order."""
  start, end = job.shard_range(k)
  before = dict(counter.stats)
  groups, encoded = {}, {}
  for example in _records(job, read, start, end, batch_size):
    progress.advance()
    if not counter(example):  # counted and skipped (a bad image, ...), never fatal
      continue
    group = groups.setdefault(example['image'].shape, [])
    group.append(example)
    if len(group) == batch_size:
      encoded.update(encoder(group))
      group.clear()
  for group in groups.values():  # each shape's last partial batch
    if group:
      encoded.update(encoder(group))
  order = sorted(encoded)
  stats = {key: counter.stats[key] - before[key] for key in before}
  job.write_shard(k, [encoded[i][0] for i in order], [encoded[i][1] for i in order], stats)


class _Read:
  """Source record `index`, processed at its size (with buckets, its bucket's)."""

  def __init__(self, job):
    self.source, self.sizes = job.source, job.sizes
    self.process = pipeline.ProcessRecord(job.config, job.tokenizer, keep_captions=True)

  def __call__(self, index, rng):
    size = None if self.sizes is None else tuple(int(v) for v in self.sizes[index])
    return self.process(self.source[int(index)], rng, size=size) | {'index': int(index)}


def _records(job, read, start, end, batch_size):
  """Source records [start, end) processed, in order, decoded ahead in threads."""
  ds = grain.MapDataset.range(start, end).seed(job.config.seed).random_map(read)
  return ds.to_iter_dataset(pipeline.read_options(job.config, batch_size))


class Encoder:
  """The frozen VAE (and text encoder) jitted over a mesh of `devices`, the batch split over
  them; batches are padded to a multiple of `pad_to` and the padding dropped."""

  def __init__(self, job, devices, pad_to):
    mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
    self._split = jax.sharding.NamedSharding(mesh, P('batch'))
    replicated = jax.sharding.NamedSharding(mesh, P())
    self.pad_to, self.dtype = pad_to, job.dtype
    vae, params = job.vae
    self._vae = jax.device_put(params, replicated)
    self._encode = jax.jit(
        lambda p, x: jnp.concatenate(vae.apply({'params': p}, x, method='encode'), -1),
        out_shardings=self._split)
    self._text, self._embed = None, None
    if job.text_encoder is not None:
      text_encoder, params = job.text_encoder
      self._text = jax.device_put(params, replicated)
      self._embed = jax.jit(lambda p, ids: text_encoder.apply({'params': p}, ids).last_hidden_state,
                            out_shardings=self._split)

  def __call__(self, examples):
    """{source index: (the record to store, (width, height))} of processed examples of one
    shape."""
    images = np.stack([e['image'] for e in examples]).astype(np.float32) / 127.5 - 1.0
    ids = np.stack([e['input_ids'] for e in examples])
    moments = self._run(self._encode, self._vae, images)
    context = None if self._embed is None else self._run(self._embed, self._text, ids)
    out = {}
    for j, e in enumerate(examples):
      record = {'moments': moments[j], 'input_ids': e['input_ids'], 'caption': e['caption'],
                'original_size': e['original_size'], 'crop_top_left': e['crop_top_left']}
      if context is not None:
        record['context'] = context[j]
      out[e['index']] = (record, (e['image'].shape[1], e['image'].shape[0]))
    return out

  def _run(self, fn, params, x):
    n = len(x)
    padded = -(-n // self.pad_to) * self.pad_to
    x = np.concatenate([x, np.zeros((padded - n,) + x.shape[1:], x.dtype)])
    return np.asarray(fn(params, jax.device_put(x, self._split)))[:n].astype(self.dtype)


class Progress:
  """Logs records done of `total`, examples/s and the ETA every `every_s` seconds."""

  def __init__(self, name, total, every_s=_PROGRESS_EVERY_S, clock=time.monotonic):
    self.name, self.total, self.every_s, self.clock = name, total, every_s, clock
    self.done, self._start = 0, clock()
    self._last = self._start

  def advance(self, n=1):
    self.done += n
    if self.clock() - self._last >= self.every_s:
      self.log()

  def log(self):
    now = self.clock()
    self._last = now
    rate = self.done / max(now - self._start, 1e-9)
    eta = datetime.timedelta(seconds=round((self.total - self.done) / rate)) if rate else '?'
    logging.info('%s: %d/%d records (%.0f%%), %.1f examples/s, ETA %s', self.name, self.done,
                 self.total, 100 * self.done / max(self.total, 1), rate, eta)
