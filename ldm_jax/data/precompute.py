"""Encode a dataset once into VAE posterior moments and text-encoder states (as MLPerf does).

Training from the result skips the VAE encoder and, when the text encoder is frozen, the text
encoder in every step. The output is an array_record tfds dataset read by the same loader with
`precomputed=True`; it keeps each caption, so caption dropout and a jointly trained text encoder
work as with images.
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from ldm_jax.data import pipeline


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
    (dataset name for `LoaderConfig.name`, loader stats of the encoding pass).
  """
  one_pass = dataclasses.replace(loader_config, shuffle=False, flip=False, caption_dropout=0.0,
                                 crop='center', num_epochs=1, batch_size=1, precomputed=False)
  config = PrecomputedConfig(name=name, loader_config=one_pass, vae=vae, text_encoder=text_encoder,
                             dtype=dtype, batch_size=batch_size)
  loader = pipeline.Loader(one_pass, tokenizer, process_index=0, process_count=1,
                           keep_captions=True)
  config.batches = _rebatch(loader, batch_size)
  Precomputed(config=config, data_dir=data_dir, file_format='array_record').download_and_prepare()
  return f'precomputed/{name}', loader.stats


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
  """Encodes the training split of `loader_config` once into `directory` (a second call finds it
  there) and returns the LoaderConfig that trains from it, with the same batches and dropout."""
  if loader_config.flip or loader_config.crop == 'random':
    logging.warning('precomputed latents are encoded once, from center crops without flips: '
                    'data.flip and random crops no longer apply')
  name, stats = precompute(loader_config, tokenizer, vae, text_encoder, directory, 'train',
                           batch_size=64)
  logging.info('training from precomputed latents %s in %s (%s)', name, directory, stats)
  return dataclasses.replace(loader_config, name=name, data_dir=directory, precomputed=True,
                             crop='center', flip=False)
