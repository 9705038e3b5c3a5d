"""Encode a dataset once into VAE posterior moments and text-encoder states (as MLPerf does).

Training from the result skips the VAE encoder and, when the text encoder is frozen, the text
encoder in every step. The output is an array_record dataset in the tfds layout
(`<data_dir>/precomputed/<name>/1.0.0`), read by the same loader with `precomputed=True`; it
keeps each caption, so caption dropout and a jointly trained text encoder work as with images.

The work is cut into shards, each a fixed contiguous range of source records; process p of P
encodes shards p, p + P, ... (`encode_shards.py`). A shard is written under a temporary name and
renamed when complete, so a killed run redoes only its unfinished shards. When every shard is
there, process 0 writes the metadata (`finalize`): `sizes.npy` (each record's size in pixels),
the tfds dataset info and, last, `inputs.json`.

Each encoding records what it was made from (`inputs.json`: the dataset and its fingerprint, the
loader settings, digests of the VAE, text encoder and tokenizer, the dtype; a run in progress
keeps the same record with its shard size in `_encoding/run.json`): a later call with other
inputs deletes it and encodes again instead of reusing or resuming stale encodings.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
from typing import Any

from etils import epath
import jax
import numpy as np
import tensorflow_datasets as tfds

from ldm_jax import distributed
from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.data import buckets as buckets_lib
from ldm_jax.data import builders
from ldm_jax.data import encode_shards
from ldm_jax.data import pipeline
from ldm_jax.data import sources

_INPUTS = pipeline.PRECOMPUTED_INPUTS
_VERSION = '1.0.0'
_PROGRESS = '_encoding'  # a run in progress: its inputs, shards being written, finished shards
_RUN = 'run.json'
SHARD_SIZE = 1024  # source records per shard (a multiple of `for_training`'s batches of 64)


@dataclasses.dataclass
class Job:
  """One encoding, the same on every process: what is encoded, with what, and where."""
  config: pipeline.LoaderConfig  # one deterministic pass (see `plan`)
  tokenizer: Any
  vae: tuple  # (AutoencoderKL, params)
  text_encoder: tuple | None  # (CLIPTextModel, params), or None: no text states stored
  dtype: np.dtype  # of the stored moments and text states
  name: str  # read back as 'precomputed/<name>'
  data_dir: str
  source: Any  # the records to encode (random access)
  sizes: np.ndarray | None  # with buckets: (n, 2) (width, height) each record is encoded at
  shard_size: int
  inputs: dict  # what the encodings depend on (inputs.json)

  @property
  def dataset_name(self):
    return f'precomputed/{self.name}'

  @property
  def split(self):
    return self.config.split.split('[')[0]  # a slice's records, under its split's name

  @property
  def version_dir(self):
    return epath.Path(self.data_dir) / 'precomputed' / self.name / _VERSION  # may be gs://

  @property
  def progress_dir(self):
    return self.version_dir / _PROGRESS

  @property
  def num_shards(self):
    return math.ceil(len(self.source) / self.shard_size)

  def shard_range(self, k):
    """The source records (start, end) of shard k."""
    return k * self.shard_size, min(len(self.source), (k + 1) * self.shard_size)

  def shard_path(self, k):
    return epath.Path(self.filename_template.sharded_filepath(shard_index=k,
                                                              num_shards=self.num_shards))

  def done_path(self, k):
    """Shard k's record (its length, sizes and stats): written once the shard is in place."""
    return self.progress_dir / f'shard-{k:05d}.json'

  def run_record(self):
    """The inputs of this run's shards: `inputs`, the shard size and the number of records."""
    return self.inputs | {'shard_size': self.shard_size, 'num_records': len(self.source)}

  def finished_shards(self):
    """The shards whose records are in place (an interrupted run's are kept)."""
    return [k for k in range(self.num_shards) if self.done_path(k).exists()]

  def write_shard(self, k, records, sizes, stats):
    """Writes shard k's records (dicts of `features`, in source order) under a temporary name,
    renames it into place, then records it as done: its length, the records' (width, height)
    in pixels, the loader stats of its source records."""
    final = self.shard_path(k)
    partial = self.progress_dir / (final.name + '.partial')
    serialized = [self.features.serialize_example(r) for r in records]
    tfds.core.file_adapters.ArrayRecordFileAdapter.write_examples(partial, enumerate(serialized))
    partial.replace(final)
    _write_json(self.done_path(k), {
        'length': len(records), 'num_bytes': sum(len(s) for s in serialized),
        'sizes': [[int(w), int(h)] for w, h in sizes], 'stats': stats})

  @property
  def filename_template(self):
    """tfds's names of the shards: precomputed-<split>.array_record-<k>-of-<n>."""
    return tfds.core.ShardedFileTemplate(
        data_dir=self.version_dir, template=tfds.core.naming.DEFAULT_FILENAME_TEMPLATE,
        dataset_name='precomputed', split=self.split, filetype_suffix='array_record')

  @functools.cached_property
  def features(self):
    """The records' tfds features ('moments' of one shape, or of any with buckets)."""
    c, (vae, _) = self.config, self.vae
    channels = 2 * vae.config.latent_channels
    if self.sizes is None:
      side = c.resolution // vae.config.downsample_factor
      moments = tfds.features.Tensor(shape=(side, side, channels), dtype=self.dtype)
    else:  # tfds stores a tensor of several unknown sides as its bytes and shape
      moments = tfds.features.Tensor(shape=(None, None, channels), dtype=self.dtype,
                                     encoding='bytes')
    features = {
        'moments': moments,
        'input_ids': tfds.features.Tensor(shape=(c.max_length,), dtype=np.int32),
        'caption': tfds.features.Text(),
        'original_size': tfds.features.Tensor(shape=(2,), dtype=np.int32),  # (height, width)
        'crop_top_left': tfds.features.Tensor(shape=(2,), dtype=np.int32),  # (top, left)
    }
    if self.text_encoder is not None:
      features['context'] = tfds.features.Tensor(
          shape=(c.max_length, self.text_encoder[0].config.hidden_size), dtype=self.dtype)
    return tfds.features.FeaturesDict(features)


def plan(loader_config, tokenizer, vae, text_encoder, data_dir, name, dtype=np.float32,
         shard_size=SHARD_SIZE):
  """The Job that encodes every record of `loader_config` (see `precompute` for the args)."""
  one_pass = dataclasses.replace(loader_config, shuffle=False, flip=False, caption_dropout=0.0,
                                 crop='center', num_epochs=1, batch_size=1, precomputed=False)
  if shard_size < 1:
    raise ValueError(f'shard_size={shard_size}: must be an integer >= 1 (source records per shard)')
  # First: a missing shapes dataset is built here, before its fingerprint is taken.
  source = sources.data_source(one_pass.name, one_pass.split, one_pass.data_dir,
                               image_key=one_pass.image_key, caption_key=one_pass.caption_key)
  if not len(source):
    raise ValueError(f'{one_pass.name} split {one_pass.split!r} in {one_pass.data_dir} has no '
                     'records: nothing to encode')
  sizes = None
  buckets = buckets_lib.parse(one_pass.buckets, one_pass.resolution)
  if buckets:  # each record is encoded at its bucket's size: the latents keep its shape
    bucket_of = buckets_lib.assign(buckets_lib.record_sizes(
        source, one_pass.name, one_pass.data_dir, one_pass.image_key), buckets)
    sizes = np.array(buckets, np.int32)[bucket_of]
  return Job(one_pass, tokenizer, vae, text_encoder, np.dtype(dtype), name, data_dir, source,
             sizes, shard_size, _inputs(one_pass, tokenizer, vae, text_encoder, dtype))


def precompute(loader_config, tokenizer, vae, text_encoder, data_dir, name, batch_size=None,
               dtype=np.float32, shard_size=SHARD_SIZE, devices=None, pad_to_batch=True):
  """Encodes every record of `loader_config` once, sharded over all processes; resumable.

  Every process calls it (it waits for the others at its start and end).

  Args:
    loader_config: what to encode (shuffle, flips and caption dropout are turned off: one pass,
      deterministic center crops; with `buckets`, each record at its bucket's size).
    tokenizer: the text encoder's tokenizer.
    vae: (AutoencoderKL, params).
    text_encoder: (CLIPTextModel, params) of a frozen text encoder, or None to store no text
      states (the text encoder is trained, or runs in each step).
    data_dir: where to write the dataset.
    name: its name; the result is read as 'precomputed/<name>'.
    batch_size: records per encoding call on this process, a multiple of the devices (None: 8
      per device).
    dtype: storage dtype of moments and context (np.float16 halves the size).
    shard_size: source records per output shard (the unit of resumption).
    devices: the devices the batch is sharded over (default: this process's).
    pad_to_batch: pad each shard's last batch (per bucket) to `batch_size`: one compile per
      shape. Else to a multiple of the devices only (each size compiles; `for_training`).

  Returns:
    (dataset name for `LoaderConfig.name`, loader stats of the encoding: on process 0 of every
    shard, on the others of the shards they encoded; all zeros when the encodings of the same
    inputs were there already).
  """
  job = plan(loader_config, tokenizer, vae, text_encoder, data_dir, name, dtype, shard_size)
  if is_finished(job):
    return job.dataset_name, pipeline.Counter.empty()
  index, count = jax.process_index(), jax.process_count()
  if index == 0:
    start(job)
  distributed.barrier(f'precompute_{name}_start')
  devices = devices or jax.local_devices()
  stats = encode_shards.encode(job, batch_size or 8 * len(devices), index, count, devices,
                               pad_to_batch)
  distributed.barrier(f'precompute_{name}_encoded')
  if index == 0:
    stats = finalize(job)
  distributed.barrier(f'precompute_{name}_done')
  return job.dataset_name, stats


def is_finished(job):
  """Whether the dataset is there, encoded from the same inputs."""
  if not (job.version_dir / 'dataset_info.json').exists():
    return False
  old = builders.read_record(job.version_dir / _INPUTS)
  return bool(old) and not _differences(old, job.inputs)


def start(job):
  """Process 0, before any shard: keeps the finished shards of an interrupted run of the same
  inputs, else deletes what is there (with the reason) and records this run's inputs."""
  run = job.run_record()
  progress = builders.read_record(job.progress_dir / _RUN)
  if progress and not _differences(progress, run):
    done = len(job.finished_shards())
    logging.info('%s: resuming an interrupted encoding, %d of %d shards done', job.dataset_name,
                 done, job.num_shards)
    return
  if job.version_dir.exists():
    old = builders.read_record(job.version_dir / _INPUTS)
    if (job.version_dir / 'dataset_info.json').exists() and old:
      changed = _differences(old, job.inputs)
    elif progress:
      changed = _differences(progress, run)
    else:
      changed = ['no record of its inputs: made by an older version, or interrupted']
    # A derived cache: encode again rather than train on encodings of something else.
    logging.warning('%s in %s is stale (%s): deleting it and encoding again', job.dataset_name,
                    job.data_dir, '; '.join(changed))
    job.version_dir.rmtree()
  job.progress_dir.mkdir(parents=True, exist_ok=True)
  _write_json(job.progress_dir / _RUN, run)


def finalize(job):
  """Process 0, once every shard is in place: writes `sizes.npy`, the tfds metadata and, last,
  `inputs.json`; removes the run's progress records. Returns the stats of all shards.

  Raises:
    RuntimeError: a shard is missing (a process failed): run again, the rest is kept.
  """
  done = [builders.read_record(job.done_path(k)) for k in range(job.num_shards)]
  missing = [k for k, d in enumerate(done) if d is None]
  if missing:
    raise RuntimeError(f'{len(missing)} of {job.num_shards} shards of {job.dataset_name} are not '
                       f'encoded (the first: {missing[0]}): run the encoding again; the finished '
                       'shards are kept')
  sizes = np.array([s for d in done for s in d['sizes']], np.int32).reshape(-1, 2)
  with (job.version_dir / buckets_lib.SIZES_FILE).open('wb') as f:
    np.save(f, sizes)  # (width, height) in pixels, in record order: buckets without reading
  split = tfds.core.SplitInfo(name=job.split, shard_lengths=[d['length'] for d in done],
                              num_bytes=sum(d['num_bytes'] for d in done))
  # disable_shuffling keeps the order: record i is the i-th source record encoded.
  tfds.folder_dataset.write_metadata(
      data_dir=job.version_dir, features=job.features, split_infos=[split],
      filename_template=job.filename_template, check_data=False, disable_shuffling=True,
      description=f'VAE moments and text states of {job.config.name}')
  (job.version_dir / _INPUTS).write_text(json.dumps(job.inputs, indent=1))
  job.progress_dir.rmtree()
  stats = pipeline.Counter.empty()
  for d in done:
    stats = {k: stats[k] + d['stats'].get(k, 0) for k in stats}
  logging.info('%s: %d records in %d shards (%s)', job.dataset_name, len(sizes), job.num_shards,
               ', '.join(f'{k} {v}' for k, v in stats.items() if v))
  return stats


def _write_json(path, value):
  """Writes `value` as JSON to `path` under a temporary name first: never a half-written file."""
  partial = path.parent / (path.name + '.partial')
  partial.write_text(json.dumps(value, indent=1))
  partial.replace(path)


def _inputs(one_pass, tokenizer, vae, text_encoder, dtype):
  """What the encodings depend on, as a JSON-serialisable dict (digests for the weights)."""
  loader = {k: v for k, v in dataclasses.asdict(one_pass).items()
            if k not in ('name', 'data_dir', 'seed', 'worker_count')}  # these change nothing
  return {
      'dataset': one_pass.name, 'data_dir': _absolute(one_pass.data_dir),
      'dataset_fingerprint': sources.fingerprint(one_pass.name, one_pass.data_dir),
      'loader': loader, 'vae': _network_digest(vae),
      'text_encoder': 'none' if text_encoder is None else _network_digest(text_encoder),
      'tokenizer': tokenizer_lib.digest(tokenizer), 'dtype': np.dtype(dtype).name,
      'format': _VERSION,
  }


def _absolute(path):
  return path if '://' in path else os.path.abspath(path)


def _network_digest(network):
  """A digest of a (Linen module, params) pair: its config and every parameter's bytes."""
  module, params = network
  h = hashlib.sha256(repr(getattr(module, 'config', module)).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.ascontiguousarray(np.asarray(leaf)).reshape(-1)
    h.update(f'{jax.tree_util.keystr(path)}:{a.dtype}:{np.shape(leaf)};'.encode())
    h.update(a.view(np.uint8))  # bytes of any dtype (bfloat16 too)
  return h.hexdigest()


def _differences(old, new):
  """What differs between two input records, in words ('dataset: 'a' -> 'b'', 'vae changed')."""
  old, new = _flat(old), _flat(new)
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if a != b:
      if key in ('vae', 'text_encoder', 'tokenizer', 'dataset_fingerprint'):  # digests
        a, b = _given(a), _given(b)
        out.append(f'{key} changed' if a == b else f'{key}: {a} -> {b}')
      else:
        out.append(f'{key}: {a!r} -> {b!r}')
  return out


def _given(digest):
  return digest if digest in ('none', 'unknown', None) else 'given'


def _flat(record):
  """{'loader': {'resolution': 32}} -> {'loader.resolution': 32}."""
  out = {}
  for key, value in record.items():
    if isinstance(value, dict):
      out.update({f'{key}.{k}': v for k, v in value.items()})
    else:
      out[key] = value
  return out


def for_training(loader_config, tokenizer, vae, text_encoder, directory):
  """Encodes the training split of `loader_config` once into `directory` (a second call with the
  same inputs finds it there; with others it encodes again) and returns the LoaderConfig that
  trains from it, with the same batches and dropout.

  It encodes as this function always has, for runs that repeat bit for bit: batches of 64 on one
  device, the last one unpadded (XLA's CPU results depend on the batch size per device).
  """
  if loader_config.flip or loader_config.crop == 'random':
    logging.warning('precomputed latents are encoded once, from center crops without flips: '
                    'data.flip and random crops no longer apply')
  name, stats = precompute(loader_config, tokenizer, vae, text_encoder, directory, 'train',
                           batch_size=64, devices=jax.local_devices()[:1], pad_to_batch=False)
  logging.info('training from precomputed latents %s in %s (%s)', name, directory,
               stats if stats['ok'] else 'encoded before from the same inputs')
  return dataclasses.replace(loader_config, name=name, data_dir=directory, precomputed=True,
                             crop='center', flip=False)
