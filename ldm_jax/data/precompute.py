"""Encode a dataset once into VAE posterior moments and text-encoder states (as MLPerf does).

Training from the result skips the VAE encoder and, when the text encoder is frozen, the text
encoder in every step. The output is an array_record tfds dataset read by the same loader with
`precomputed=True`; it keeps each caption, so caption dropout and a jointly trained text encoder
work as with images.

Each encoding records what it was made from (`inputs.json` in its version folder: the dataset and
its fingerprint, the loader settings, digests of the VAE, text encoder and tokenizer, the
dtype); a later call with other inputs encodes again instead of reusing stale encodings.
"""

import dataclasses
import hashlib
import json
import logging
import os

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.data import builders
from ldm_jax.data import pipeline
from ldm_jax.data import sources

_INPUTS = pipeline.PRECOMPUTED_INPUTS


class PrecomputedConfig(tfds.core.BuilderConfig):

  def __init__(self, *, name, loader_config, vae, text_encoder, dtype, batch_size):
    super().__init__(name=name, version=tfds.core.Version('1.0.0'),
                     description=f'VAE moments and text states of {loader_config.name}')
    self.loader_config, self.vae, self.text_encoder = loader_config, vae, text_encoder
    self.dtype, self.batch_size = dtype, batch_size


class Precomputed(tfds.core.GeneratorBasedBuilder):
  """Per example: 'moments' (h, w, 2 * latent channels), 'caption', the ids, and 'context' (L, D)
  when a text encoder is given."""
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = []

  def _info(self):
    c = self.builder_config
    vae, _ = c.vae
    side = c.loader_config.resolution // vae.config.downsample_factor
    features = {
        'moments': tfds.features.Tensor(shape=(side, side, 2 * vae.config.latent_channels),
                                        dtype=c.dtype),
        'input_ids': tfds.features.Tensor(shape=(c.loader_config.max_length,), dtype=np.int32),
        'caption': tfds.features.Text(),
    }
    if c.text_encoder is not None:
      features['context'] = tfds.features.Tensor(
          shape=(c.loader_config.max_length, c.text_encoder[0].config.hidden_size), dtype=c.dtype)
    # disable_shuffling keeps the source's record order: record i encodes source record i.
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                 features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {self.builder_config.loader_config.split.split('[')[0]: self._generate_examples()}

  def _generate_examples(self):
    c = self.builder_config
    vae, vae_params = c.vae
    encode = jax.jit(lambda p, x: jnp.concatenate(vae.apply({'params': p}, x, method='encode'), -1))
    if c.text_encoder is not None:
      te, te_params = c.text_encoder
      embed = jax.jit(lambda p, ids: te.apply({'params': p}, ids).last_hidden_state)
    key = 0
    for batch in c.batches:
      moments = np.asarray(encode(vae_params, batch['image']), c.dtype)
      if c.text_encoder is not None:
        context = np.asarray(embed(te_params, batch['input_ids']), c.dtype)
      for k in range(len(moments)):
        record = {'moments': moments[k], 'input_ids': batch['input_ids'][k],
                  'caption': batch['caption'][k]}
        if c.text_encoder is not None:
          record['context'] = context[k]
        yield key, record
        key += 1


def precompute(loader_config, tokenizer, vae, text_encoder, data_dir, name, batch_size=16,
               dtype=np.float32):
  """Encodes every record of `loader_config` once.

  Args:
    loader_config: what to encode (shuffle, flips and caption dropout are turned off: one pass,
      deterministic center crops).
    tokenizer: the text encoder's tokenizer.
    vae: (AutoencoderKL, params).
    text_encoder: (CLIPTextModel, params) of a frozen text encoder, or None to store no text
      states (the text encoder is trained, or runs in each step).
    data_dir: where to write the dataset.
    name: its config name; the result is read as 'precomputed/<name>'.
    batch_size: encoding batch (the last partial batch is encoded too).
    dtype: storage dtype of moments and context (np.float16 halves the size).

  Returns:
    (dataset name for `LoaderConfig.name`, loader stats of the encoding pass: all zeros when
    the encodings of the same inputs were there already).
  """
  one_pass = dataclasses.replace(loader_config, shuffle=False, flip=False, caption_dropout=0.0,
                                 crop='center', num_epochs=1, batch_size=1, precomputed=False)
  config = PrecomputedConfig(name=name, loader_config=one_pass, vae=vae, text_encoder=text_encoder,
                             dtype=dtype, batch_size=batch_size)
  loader = pipeline.Loader(one_pass, tokenizer, process_index=0, process_count=1,
                           keep_captions=True)  # first: a shapes dataset may be built on demand
  inputs = _inputs(one_pass, tokenizer, vae, text_encoder, dtype)
  builder = Precomputed(config=config, data_dir=data_dir, file_format='array_record')
  record = epath.Path(builder.data_dir) / _INPUTS  # the workdir may be gs://
  if (epath.Path(builder.data_dir) / 'dataset_info.json').exists():
    old = builders.read_record(record)
    changed = (_differences(old, inputs) if old
               else ['no record of its inputs: made by an older version, or interrupted'])
    if not changed:
      return f'precomputed/{name}', loader.stats
    # A derived cache: encode again rather than train on encodings of something else.
    logging.warning('precomputed/%s in %s is stale (%s): deleting it and encoding again', name,
                    data_dir, '; '.join(changed))
    epath.Path(builder.data_dir).rmtree()
    builder = Precomputed(config=config, data_dir=data_dir, file_format='array_record')
  config.batches = _rebatch(loader, batch_size)
  builder.download_and_prepare()
  record.write_text(json.dumps(inputs, indent=1))
  return f'precomputed/{name}', loader.stats


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
      'format': str(Precomputed.VERSION),
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


def _rebatch(loader, batch_size):
  """Groups the loader's single-example batches, keeping the last partial group."""
  group = []
  for batch in loader:
    group.append(batch)
    if len(group) == batch_size:
      yield _concatenate(group)
      group = []
  if group:
    yield _concatenate(group)


def _concatenate(group):
  return {k: np.concatenate([b[k] for b in group]) for k in ('image', 'input_ids', 'caption')}


def for_training(loader_config, tokenizer, vae, text_encoder, directory):
  """Encodes the training split of `loader_config` once into `directory` (a second call with the
  same inputs finds it there; with others it encodes again) and returns the LoaderConfig that
  trains from it, with the same batches and dropout."""
  if loader_config.flip or loader_config.crop == 'random':
    logging.warning('precomputed latents are encoded once, from center crops without flips: '
                    'data.flip and random crops no longer apply')
  name, stats = precompute(loader_config, tokenizer, vae, text_encoder, directory, 'train',
                           batch_size=64)
  logging.info('training from precomputed latents %s in %s (%s)', name, directory,
               stats if stats['ok'] else 'encoded before from the same inputs')
  return dataclasses.replace(loader_config, name=name, data_dir=directory, precomputed=True,
                             crop='center', flip=False)
